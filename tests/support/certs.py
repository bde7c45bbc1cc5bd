"""A throwaway PKI for tests that talk to real TLS peers (mosquitto, curl, openssl, socat).

ECDSA P-256 keys and SHA-256 signatures throughout. Every certificate carries the extensions
OpenSSL 3's strict chain checks insist on (critical basicConstraints and keyUsage, subject and
authority key identifiers), so the same chains verify under ``ssl.create_default_context()``
(which sets ``VERIFY_X509_STRICT`` from Python 3.13 on) and under the OpenSSL command-line tools.

Time is never read behind the caller's back: :meth:`TestCA.create` takes ``now`` (defaulting to
the wall clock, since the real peers validate against the wall clock) and every issued
certificate's window is a :class:`Validity` built from that instant unless one is passed in.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PEM = serialization.Encoding.PEM
_CLOCK_SKEW = timedelta(minutes=5)  # backdating, so a peer with a slightly slow clock agrees


@dataclass(frozen=True)
class Validity:
    """A certificate's ``notBefore``/``notAfter`` window."""

    not_before: datetime
    not_after: datetime

    @classmethod
    def valid(cls, now: datetime, *, days: int = 30) -> Validity:
        """Valid at ``now`` (backdated a few minutes) for ``days`` days."""
        return cls(now - _CLOCK_SKEW, now + timedelta(days=days))

    @classmethod
    def expired(cls, now: datetime, *, days_ago: int = 1) -> Validity:
        """Expired ``days_ago`` days before ``now`` (after a 30-day life)."""
        not_after = now - timedelta(days=days_ago)
        return cls(not_after - timedelta(days=30), not_after)

    @classmethod
    def not_yet_valid(cls, now: datetime, *, days_ahead: int = 1) -> Validity:
        """Becomes valid ``days_ahead`` days after ``now`` (for a 30-day life)."""
        not_before = now + timedelta(days=days_ahead)
        return cls(not_before, not_before + timedelta(days=30))


@dataclass(frozen=True)
class CertFiles:
    """PEM files on disk: ``cert`` is the leaf followed by any intermediates."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Issued:
    """A certificate, its private key and the intermediates between it and the root."""

    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey = field(repr=False)
    intermediates: tuple[x509.Certificate, ...] = ()

    @property
    def common_name(self) -> str | None:
        return subject_common_name(self.certificate)

    def chain(self) -> tuple[x509.Certificate, ...]:
        """Leaf first, then intermediates: what a TLS peer sends (the root is never sent)."""
        return (self.certificate, *self.intermediates)

    def key_pem(self) -> bytes:
        return private_key_pem(self.private_key)

    def chain_pem(self) -> bytes:
        return certificates_pem(self.chain())

    def write(self, directory: Path, stem: str) -> CertFiles:
        """``<stem>.crt`` (chain) and ``<stem>.key`` (PKCS#8, mode 0600) in ``directory``."""
        return write_cert_files(directory, stem, self.chain(), self.private_key)


def certificates_pem(certificates: Sequence[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(PEM) for c in certificates)


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def write_cert_files(
    directory: Path,
    stem: str,
    chain: Sequence[x509.Certificate],
    key: ec.EllipticCurvePrivateKey,
) -> CertFiles:
    """Write any chain (in the given order, even a wrong one) and key as PEM files."""
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_path.write_bytes(certificates_pem(chain))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(private_key_pem(key))
    return CertFiles(cert=cert_path, key=key_path)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def spki_sha256_b64(certificate: x509.Certificate) -> str:
    """Base64 of SHA-256 over the DER SubjectPublicKeyInfo (the HPKP / ``pin-sha256`` form)."""
    spki = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode("ascii")


def subject_common_name(certificate: x509.Certificate) -> str | None:
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        return None
    value = names[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def subject_alt_names(certificate: x509.Certificate) -> tuple[str, ...]:
    """SAN entries as ``DNS:x``, ``IP:x``, ``URI:x``, ``email:x`` (OpenSSL's spelling)."""
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    return (
        *(f"DNS:{name}" for name in san.get_values_for_type(x509.DNSName)),
        *(f"IP:{address}" for address in san.get_values_for_type(x509.IPAddress)),
        *(f"URI:{uri}" for uri in san.get_values_for_type(x509.UniformResourceIdentifier)),
        *(f"email:{email}" for email in san.get_values_for_type(x509.RFC822Name)),
    )


@dataclass(frozen=True)
class PeerCertificate:
    """What a test server saw of the certificate its client presented."""

    der: bytes = field(repr=False)
    common_name: str | None
    subject_alt_names: tuple[str, ...]
    spki_sha256_b64: str

    @classmethod
    def from_der(cls, der: bytes) -> PeerCertificate:
        certificate = x509.load_der_x509_certificate(der)
        return cls(
            der=der,
            common_name=subject_common_name(certificate),
            subject_alt_names=subject_alt_names(certificate),
            spki_sha256_b64=spki_sha256_b64(certificate),
        )


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _ski(key: ec.EllipticCurvePrivateKey) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(key.public_key())


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def _leaf_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _ca_certificate(
    common_name: str,
    key: ec.EllipticCurvePrivateKey,
    validity: Validity,
    issuer: Issued | None,
    path_length: int | None,
) -> x509.Certificate:
    signer_key = key if issuer is None else issuer.private_key
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name) if issuer is None else issuer.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity.not_before)
        .not_valid_after(validity.not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(_ski(key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_key.public_key()),
            critical=False,
        )
    )
    return builder.sign(signer_key, hashes.SHA256())


@dataclass(frozen=True)
class TestCA:
    """A root (and, optionally, one intermediate that signs every leaf)."""

    __test__ = False  # not a pytest test class, whatever its name

    root: Issued
    intermediate: Issued | None
    now: datetime  # the instant default validity windows are built around

    @classmethod
    def create(
        cls,
        name: str = "fleetgate test root",
        *,
        intermediate: bool = False,
        now: datetime | None = None,
        ca_validity: Validity | None = None,
    ) -> TestCA:
        now = datetime.now(UTC) if now is None else now
        # Wide enough that expired and not-yet-valid leaves still sit inside their CA's life.
        window = ca_validity or Validity(now - timedelta(days=365), now + timedelta(days=3650))
        root_key = new_key()
        root = Issued(_ca_certificate(name, root_key, window, None, None), root_key)
        sub: Issued | None = None
        if intermediate:
            sub_key = new_key()
            sub_cert = _ca_certificate(f"{name} intermediate", sub_key, window, root, 0)
            sub = Issued(sub_cert, sub_key, ())
        return cls(root=root, intermediate=sub, now=now)

    @property
    def certificate(self) -> x509.Certificate:
        """The trust anchor."""
        return self.root.certificate

    @property
    def _signer(self) -> Issued:
        return self.intermediate or self.root

    def bundle_pem(self, *, include_intermediate: bool = False) -> bytes:
        """The trust anchor (and the intermediate, for peers that want the whole path)."""
        certs = [self.root.certificate]
        if include_intermediate and self.intermediate is not None:
            certs.append(self.intermediate.certificate)
        return certificates_pem(certs)

    def write_bundle(self, path: Path, *, include_intermediate: bool = False) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.bundle_pem(include_intermediate=include_intermediate))
        return path

    def issue_server(
        self,
        *,
        dns_names: Sequence[str] = ("localhost",),
        ip_addresses: Sequence[str] = ("127.0.0.1",),
        common_name: str | None = None,
        validity: Validity | None = None,
        key: ec.EllipticCurvePrivateKey | None = None,
    ) -> Issued:
        """A serverAuth leaf; SAN holds ``dns_names`` and ``ip_addresses``."""
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
        cn = common_name or (dns_names[0] if dns_names else "test server")
        return self._issue_leaf(cn, names, ExtendedKeyUsageOID.SERVER_AUTH, validity, key)

    def issue_client(
        self,
        common_name: str,
        *,
        dns_names: Sequence[str] = (),
        uris: Sequence[str] = (),
        emails: Sequence[str] = (),
        validity: Validity | None = None,
        key: ec.EllipticCurvePrivateKey | None = None,
    ) -> Issued:
        """A clientAuth leaf with subject ``CN=common_name`` and a SAN only if names are given."""
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
        names += [x509.UniformResourceIdentifier(u) for u in uris]
        names += [x509.RFC822Name(e) for e in emails]
        return self._issue_leaf(common_name, names, ExtendedKeyUsageOID.CLIENT_AUTH, validity, key)

    def _issue_leaf(
        self,
        common_name: str,
        names: list[x509.GeneralName],
        usage: x509.ObjectIdentifier,
        validity: Validity | None,
        key: ec.EllipticCurvePrivateKey | None,
    ) -> Issued:
        window = validity or Validity.valid(self.now)
        key = key or new_key()
        signer = self._signer
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(signer.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(window.not_before)
            .not_valid_after(window.not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_leaf_key_usage(), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(_ski(key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.private_key.public_key()),
                critical=False,
            )
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        certificate = builder.sign(signer.private_key, hashes.SHA256())
        intermediates = () if self.intermediate is None else (self.intermediate.certificate,)
        return Issued(certificate, key, intermediates)
