"""The signature fleetgate puts on every request it forwards over HTTP(S) for a device.

Unlike a bare SHA-256 over a pre-shared key, this is an HMAC-SHA256 (a keyed MAC), over a
canonical string that binds the method, the path with query, a digest of the body, a timestamp,
a single-use nonce and the device id; the key is named by a key id so keys can be rotated.

Headers added to the request::

    X-Fleetgate-Device:          the device id
    X-Fleetgate-Timestamp:       Unix seconds
    X-Fleetgate-Nonce:           32 hex characters, unique per request
    X-Fleetgate-Content-SHA256:  hex SHA-256 of the body (of b"" when there is none)
    X-Fleetgate-Key-Id:          which key signed (the hmac credential's public key_id)
    X-Fleetgate-Signature:       v1=<hex HMAC-SHA256(key, canonical string)>

The canonical string is these seven lines joined by ``\\n`` (no trailing newline)::

    v1
    <timestamp>
    <nonce>
    <METHOD>
    <path and query, exactly as sent in the request line>
    <content sha256 hex>
    <device id>

A receiver recomputes the body digest, rebuilds the string from the headers it received,
compares the MAC in constant time, and rejects timestamps outside its tolerance (say 300 s)
and nonces it has seen within that window. :func:`verify` does all but the nonce memory.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping

VERSION = "v1"
DEFAULT_TOLERANCE_S = 300


def canonical(
    *, timestamp: int, nonce: str, method: str, target: str, body_sha256: str, device_id: str
) -> bytes:
    return "\n".join(
        (VERSION, str(timestamp), nonce, method.upper(), target, body_sha256, device_id)
    ).encode()


def signature_headers(
    key: bytes,
    key_id: str,
    *,
    method: str,
    target: str,
    body: bytes,
    device_id: str,
    timestamp: int,
    nonce: str | None = None,
) -> list[tuple[str, str]]:
    nonce = nonce or secrets.token_hex(16)
    digest = hashlib.sha256(body).hexdigest()
    mac = hmac.new(
        key,
        canonical(
            timestamp=timestamp,
            nonce=nonce,
            method=method,
            target=target,
            body_sha256=digest,
            device_id=device_id,
        ),
        hashlib.sha256,
    ).hexdigest()
    return [
        ("X-Fleetgate-Timestamp", str(timestamp)),
        ("X-Fleetgate-Nonce", nonce),
        ("X-Fleetgate-Content-SHA256", digest),
        ("X-Fleetgate-Key-Id", key_id),
        ("X-Fleetgate-Signature", f"{VERSION}={mac}"),
    ]


def verify(
    key: bytes,
    *,
    method: str,
    target: str,
    body: bytes,
    headers: Mapping[str, str],
    now: int,
    tolerance_s: int = DEFAULT_TOLERANCE_S,
) -> bool:
    """Whether a request's fleetgate signature is valid (``headers`` keyed in lowercase)."""
    try:
        stamp = headers["x-fleetgate-timestamp"]
        nonce = headers["x-fleetgate-nonce"]
        digest = headers["x-fleetgate-content-sha256"]
        device_id = headers["x-fleetgate-device"]
        scheme, _, mac = headers["x-fleetgate-signature"].partition("=")
    except KeyError:
        return False
    # The MAC covers the timestamp as the signer wrote it (plain decimal): int() alone would also
    # take "+1795334400", "1_795_334_400" or leading zeros, which a receiver following the
    # documented recipe (it signs the header text) rejects. compare_digest raises TypeError on
    # non-ASCII text, so such headers are refused before it.
    if not (stamp.isascii() and stamp.isdigit()) or str(int(stamp)) != stamp:
        return False
    if not (digest.isascii() and mac.isascii()):
        return False
    timestamp = int(stamp)
    if scheme != VERSION or abs(now - timestamp) > tolerance_s:
        return False
    if not hmac.compare_digest(digest, hashlib.sha256(body).hexdigest()):
        return False
    expected = hmac.new(
        key,
        canonical(
            timestamp=timestamp,
            nonce=nonce,
            method=method,
            target=target,
            body_sha256=digest,
            device_id=device_id,
        ),
        hashlib.sha256,
    ).hexdigest()
    return hmac.compare_digest(expected, mac)
