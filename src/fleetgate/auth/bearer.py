"""Bearer token strings: generated with 256 bits of entropy, stored only as a digest."""

from __future__ import annotations

import hashlib
import secrets

from fleetgate.sealing import Secret

TOKEN_PREFIX = "fgt_"  # noqa: S105 - a prefix, not a secret
MAX_TOKEN_CHARS = 512


def new_token_id() -> str:
    return "tok_" + secrets.token_hex(8)


def new_bearer() -> Secret:
    return Secret(TOKEN_PREFIX + secrets.token_urlsafe(32))


def digest(bearer: Secret) -> bytes:
    """The token's stored form. Tokens are random, so a fast hash is enough (no dictionary)."""
    return hashlib.sha256(b"fleetgate api token\0" + bearer.reveal()).digest()
