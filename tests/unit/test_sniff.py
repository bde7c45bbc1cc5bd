"""What a session client's first bytes are taken for, and what the operator is told."""

from __future__ import annotations

import pytest

from fleetgate.remote.sniff import (
    diagnose_on_plain_session,
    diagnose_on_tls_session,
    looks_like_tls,
    spoken,
)

CLIENT_HELLO = bytes.fromhex("160301020001")  # record header of a TLS 1.2+ ClientHello


@pytest.mark.parametrize(
    ("opening", "kind"),
    [
        (b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n", "ssh"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "http"),
        (b"POST /api HTTP/1.0\r\n", "http"),
        (bytes.fromhex("0300002b26e00000000000436f6f6b69653a"), "rdp"),
        (CLIENT_HELLO, "tls"),
        (b"RFB 003.008\n", "unknown"),
        (b"\x00\x01", "unknown"),
    ],
)
def test_first_flights_are_recognized(opening: bytes, kind: str) -> None:
    assert spoken(opening) == kind


def test_only_a_handshake_record_looks_like_tls() -> None:
    assert looks_like_tls(CLIENT_HELLO)
    assert not looks_like_tls(b"\x17\x03\x03")  # application data, not a handshake
    assert not looks_like_tls(b"\x16\x02\x00")  # SSL 2 version numbers
    assert not looks_like_tls(b"\x16")


def test_a_tls_session_explains_each_wrong_client_in_plain_words() -> None:
    ssh = diagnose_on_tls_session(b"SSH-2.0-OpenSSH_9.2p1\r\n")
    assert ssh.startswith("the client sent an SSH banner; this session terminates TLS")
    assert "without --tls" in ssh
    assert "an HTTP request" in diagnose_on_tls_session(b"GET / HTTP/1.1\r\n")
    assert "an RDP connection request" in diagnose_on_tls_session(
        bytes.fromhex("0300002b26e0000000000043")
    )
    assert "0001020304050607" in diagnose_on_tls_session(bytes(range(16)))
    silent = diagnose_on_tls_session(b"")
    assert "sent nothing" in silent
    assert "VNC" in silent


def test_a_plain_session_explains_a_tls_client() -> None:
    said = diagnose_on_plain_session()
    assert "started a TLS handshake" in said
    assert "--tls" in said
