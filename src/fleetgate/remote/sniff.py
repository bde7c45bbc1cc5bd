"""What a client's first bytes say it speaks, and what to tell the operator when that does not
fit the session (SORACOM Napter's users got a bare FIN and no reason)."""

from __future__ import annotations

import re

_HTTP = re.compile(rb"^(GET|POST|PUT|HEAD|DELETE|OPTIONS|PATCH|CONNECT) [^ ]+ HTTP/1\.[01]\r?\n?")


def looks_like_tls(opening: bytes) -> bool:
    """A TLS handshake record: content type 22, version 3.x."""
    return len(opening) >= 3 and opening[0] == 0x16 and opening[1] == 0x03 and opening[2] <= 0x04


def spoken(opening: bytes) -> str:
    """A short name for what ``opening`` is: ssh, http, rdp, tls, or unknown."""
    if opening.startswith(b"SSH-"):
        return "ssh"
    if _HTTP.match(opening) or opening[:4] in (b"GET ", b"POST", b"HEAD", b"PUT "):
        return "http"
    if len(opening) >= 6 and opening[:2] == b"\x03\x00" and opening[5] & 0xF0 == 0xE0:
        return "rdp"  # a TPKT header (RFC 1006), then an X.224 connection request (code 0xE)
    if looks_like_tls(opening):
        return "tls"
    return "unknown"


_NAMES = {"ssh": "an SSH banner", "http": "an HTTP request", "rdp": "an RDP connection request"}


def diagnose_on_tls_session(opening: bytes) -> str:
    """Why a ``tls`` session refused a client that did not start TLS, in plain words."""
    if not opening:
        return (
            "the client sent nothing; this session terminates TLS and waits for a TLS "
            "handshake. A client that waits for the server to speak first (VNC, or a raw "
            "TCP client) needs a session without --tls, or fleetgate connect in front of it"
        )
    kind = spoken(opening)
    what = _NAMES.get(kind, f"bytes that are not TLS ({opening[:8].hex()}…)")
    return (
        f"the client sent {what}; this session terminates TLS. Open it without --tls, or put "
        "fleetgate connect (or stunnel) in front of the client"
    )


def diagnose_on_plain_session() -> str:
    """Why a plain session refused a client that started TLS."""
    return (
        "the client started a TLS handshake; this session forwards bytes as they are and the "
        "device does not speak TLS on this port. Open the session with --tls, or connect "
        "without TLS"
    )
