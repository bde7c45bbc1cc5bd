"""Key algorithms fleetgate generates and accepts, and their signature hashes."""

from __future__ import annotations

import enum

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificateIssuerPublicKeyTypes,
    CertificatePublicKeyTypes,
)

from fleetgate.errors import InvalidRequest

PrivateKey = CertificateIssuerPrivateKeyTypes
PublicKey = CertificatePublicKeyTypes


class KeyAlgorithm(enum.StrEnum):
    EC_P256 = "ec-p256"
    EC_P384 = "ec-p384"
    RSA_2048 = "rsa-2048"
    RSA_3072 = "rsa-3072"
    RSA_4096 = "rsa-4096"
    ED25519 = "ed25519"


def generate_key(algorithm: KeyAlgorithm) -> PrivateKey:
    """A new private key (RSA takes a while: call it off the event loop)."""
    match algorithm:
        case KeyAlgorithm.EC_P256:
            return ec.generate_private_key(ec.SECP256R1())
        case KeyAlgorithm.EC_P384:
            return ec.generate_private_key(ec.SECP384R1())
        case KeyAlgorithm.ED25519:
            return ed25519.Ed25519PrivateKey.generate()
        case _:
            bits = int(algorithm.value.split("-")[1])
            return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def algorithm_of(key: PublicKey | PrivateKey) -> KeyAlgorithm:
    """The algorithm of a key we accept; anything else (DSA, small RSA, other curves) is refused."""
    public = key.public_key() if hasattr(key, "public_key") else key
    if isinstance(public, ec.EllipticCurvePublicKey):
        if isinstance(public.curve, ec.SECP256R1):
            return KeyAlgorithm.EC_P256
        if isinstance(public.curve, ec.SECP384R1):
            return KeyAlgorithm.EC_P384
        raise InvalidRequest(f"EC curve {public.curve.name} is not accepted; use P-256 or P-384")
    if isinstance(public, rsa.RSAPublicKey):
        size = public.key_size
        if size in (2048, 3072, 4096):
            return KeyAlgorithm(f"rsa-{size}")
        raise InvalidRequest(f"RSA-{size} is not accepted; use 2048, 3072 or 4096 bits")
    if isinstance(public, ed25519.Ed25519PublicKey):
        return KeyAlgorithm.ED25519
    raise InvalidRequest(f"{type(public).__name__} keys are not accepted")


def signature_hash(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384 | None:
    """The hash a CA key signs with (None for Ed25519, which hashes internally)."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP384R1):
        return hashes.SHA384()
    return hashes.SHA256()


def issuer_public_key(key: PrivateKey) -> CertificateIssuerPublicKeyTypes:
    return key.public_key()


def private_key_pem(key: PrivateKey) -> bytes:
    """PKCS#8, unencrypted: only ever sealed before it is stored."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_private_key_pem(data: bytes, password: bytes | None = None) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=password)
    except (ValueError, TypeError) as exc:
        raise InvalidRequest(f"not a usable PEM private key: {exc}", field="key") from None
    if not isinstance(
        key,
        (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey),
    ):
        raise InvalidRequest(f"{type(key).__name__} keys are not accepted", field="key")
    algorithm_of(key)
    return key
