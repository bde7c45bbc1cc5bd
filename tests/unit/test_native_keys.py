"""A client identity's private key, read by OpenSSL in every form a credential may hold it.

Keys whose kind the PEM names are read by that kind's decoder alone (much cheaper than letting
OpenSSL 3 try them all); every other form takes the general path. Either way the key must be
the one the certificate names, and what cannot be read is refused as before.
"""

from __future__ import annotations

import datetime
import subprocess
from collections.abc import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID

from fleetgate.dataplane import native

pytestmark = pytest.mark.skipif(not native.AVAILABLE, reason=native.WHY_NOT)

type PrivateKey = (
    ec.EllipticCurvePrivateKey
    | rsa.RSAPrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)


def _certificate(key: PrivateKey) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "key-reading")])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    edwards = isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey)
    algorithm = None if edwards else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)


def _pem(key: PrivateKey, form: serialization.PrivateFormat) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, form, serialization.NoEncryption())


PKCS8, TRADITIONAL = (
    serialization.PrivateFormat.PKCS8,
    serialization.PrivateFormat.TraditionalOpenSSL,
)
EC, RSA, ED25519 = 408, 6, 1087  # OpenSSL's EVP_PKEY_* numbers
KEYS: dict[str, tuple[Callable[[], PrivateKey], serialization.PrivateFormat, int | None]] = {
    # name: (key, form, the kind its own decoder reads it as; None: the general reader)
    "ec-pkcs8": (lambda: ec.generate_private_key(ec.SECP256R1()), PKCS8, EC),
    "ec-traditional": (lambda: ec.generate_private_key(ec.SECP384R1()), TRADITIONAL, EC),
    "rsa-pkcs8": (lambda: rsa.generate_private_key(65537, 2048), PKCS8, RSA),
    "rsa-traditional": (lambda: rsa.generate_private_key(65537, 2048), TRADITIONAL, RSA),
    "ed25519-pkcs8": (ed25519.Ed25519PrivateKey.generate, PKCS8, ED25519),
    "ed448-pkcs8": (ed448.Ed448PrivateKey.generate, PKCS8, None),
}


@pytest.mark.parametrize("name", list(KEYS))
def test_each_form_reads_the_key_the_certificate_names(name: str) -> None:
    make, form, kind = KEYS[name]
    key = make()
    pem = _pem(key, form)
    hinted = native._key_der(pem)
    assert (hinted[0] if hinted else None) == kind
    native.ClientIdentity(_certificate(key), pem)  # raises unless the key matches


def test_a_key_that_is_not_the_certificates_is_refused() -> None:
    key, other = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(ValueError, match="does not belong"):
        native.ClientIdentity(_certificate(key), _pem(other, PKCS8))


def test_openssl_ecparam_output_with_its_parameters_block_first() -> None:
    generated = subprocess.run(
        ["openssl", "ecparam", "-name", "prime256v1", "-genkey"],
        capture_output=True,
        check=True,
    ).stdout
    assert b"BEGIN EC PARAMETERS" in generated  # the block the reader must step over
    key = serialization.load_pem_private_key(generated, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert native._key_der(generated) is not None
    native.ClientIdentity(_certificate(key), generated)


def test_an_encrypted_key_is_refused_without_asking_for_a_password() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    assert native._key_der(encrypted) is None
    with pytest.raises(ValueError, match="no private key"):
        native.ClientIdentity(_certificate(key), encrypted)


def test_a_hint_that_is_wrong_falls_back_to_the_general_reader() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = _pem(key, TRADITIONAL).replace(b"EC PRIVATE KEY", b"RSA PRIVATE KEY")
    # The label lies (RSA): the RSA decoder fails, and the general reader fails as OpenSSL's
    # own PEM reader does on a label that does not match its content.
    with pytest.raises(ValueError, match="no private key"):
        native.ClientIdentity(_certificate(key), pem)
