"""AES-256-GCM sealing bound to the secret's name.

The name is the associated data, so a sealed value copied onto another row fails to open instead
of silently becoming that row's secret.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fleetgate.errors import SealingError
from fleetgate.sealing.keyring import Keyring
from fleetgate.sealing.secret import Secret

NONCE_BYTES = 12
_AAD_PREFIX = b"fleetgate sealed v1\0"


@dataclass(frozen=True)
class SealedBox:
    key_id: str
    nonce: bytes
    ciphertext: bytes


def seal(keyring: Keyring, name: str, value: Secret) -> SealedBox:
    key = keyring.active
    nonce = os.urandom(NONCE_BYTES)
    aead = AESGCM(key.material.reveal())
    ciphertext = aead.encrypt(nonce, value.reveal(), _AAD_PREFIX + name.encode())
    return SealedBox(key_id=key.key_id, nonce=nonce, ciphertext=ciphertext)


def open_box(keyring: Keyring, name: str, box: SealedBox) -> Secret:
    key = keyring.get(box.key_id)
    if len(box.nonce) != NONCE_BYTES:
        raise SealingError(f"sealed secret {name!r} has a {len(box.nonce)}-byte nonce; corrupt")
    aead = AESGCM(key.material.reveal())
    try:
        plain = aead.decrypt(box.nonce, box.ciphertext, _AAD_PREFIX + name.encode())
    except (InvalidTag, ValueError):
        raise SealingError(f"sealed secret {name!r} failed authentication") from None
    return Secret(plain)
