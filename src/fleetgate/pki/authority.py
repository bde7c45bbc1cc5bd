"""Building certificates: self-signed roots, subordinate CAs and end-entity certificates."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import AuthorityInformationAccessOID, NameOID

from fleetgate.pki.keys import PrivateKey, PublicKey, signature_hash
from fleetgate.pki.profiles import RULES, Profile, key_usage

# Certificates start a little in the past so a device whose clock lags still accepts them.
BACKDATE = timedelta(minutes=1)
ORGANIZATION = "fleetgate"


@dataclass(frozen=True)
class Issuer:
    ca_id: str
    certificate: x509.Certificate
    key: PrivateKey


@dataclass(frozen=True)
class RevocationUrls:
    """Where relying parties find the issuer's CRL, OCSP responder and certificate."""

    crl: str | None = None
    ocsp: str | None = None
    ca_issuers: str | None = None


@dataclass(frozen=True)
class Subject:
    common_name: str
    dns_names: tuple[str, ...] = ()
    ip_addresses: tuple[str, ...] = ()
    uris: tuple[str, ...] = ()
    emails: tuple[str, ...] = ()
    organization: str | None = None

    def name(self) -> x509.Name:
        attributes = [x509.NameAttribute(NameOID.COMMON_NAME, self.common_name)]
        if self.organization:
            attributes.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, self.organization))
        return x509.Name(attributes)

    def general_names(self) -> list[x509.GeneralName]:
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in self.dns_names]
        names += [x509.IPAddress(ipaddress.ip_address(a)) for a in self.ip_addresses]
        names += [x509.UniformResourceIdentifier(u) for u in self.uris]
        names += [x509.RFC822Name(e) for e in self.emails]
        return names


@dataclass(frozen=True)
class Validity:
    not_before: datetime
    not_after: datetime

    @classmethod
    def starting(cls, now: datetime, lifetime: timedelta, cap: datetime | None = None) -> Validity:
        end = now + lifetime
        if cap is not None and end > cap:
            end = cap  # never outlive the issuer
        return cls(not_before=now - BACKDATE, not_after=end)


@dataclass(frozen=True)
class CertificateRequest:
    profile: Profile
    subject: Subject
    public_key: PublicKey
    serial: int
    validity: Validity
    urls: RevocationUrls = field(default_factory=RevocationUrls)


def _builder(request: CertificateRequest, issuer_name: x509.Name) -> x509.CertificateBuilder:
    rules = RULES[request.profile]
    builder = (
        x509.CertificateBuilder()
        .subject_name(request.subject.name())
        .issuer_name(issuer_name)
        .public_key(request.public_key)
        .serial_number(request.serial)
        .not_valid_before(request.validity.not_before)
        .not_valid_after(request.validity.not_after)
        .add_extension(
            x509.BasicConstraints(ca=rules.is_ca, path_length=rules.path_length), critical=True
        )
        .add_extension(
            key_usage(
                request.profile, rsa_key_exchange=isinstance(request.public_key, rsa.RSAPublicKey)
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(request.public_key), False)
    )
    if rules.extended_key_usages:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage(list(rules.extended_key_usages)), critical=False
        )
    general_names = request.subject.general_names()
    if general_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(general_names), critical=False)
    if rules.ocsp_nocheck:
        builder = builder.add_extension(x509.OCSPNoCheck(), critical=False)
    if rules.revocation_info:
        urls = request.urls
        if urls.crl:
            point = x509.DistributionPoint(
                full_name=[x509.UniformResourceIdentifier(urls.crl)],
                relative_name=None,
                reasons=None,
                crl_issuer=None,
            )
            builder = builder.add_extension(x509.CRLDistributionPoints([point]), critical=False)
        access = []
        if urls.ocsp:
            access.append(
                x509.AccessDescription(
                    AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(urls.ocsp)
                )
            )
        if urls.ca_issuers:
            access.append(
                x509.AccessDescription(
                    AuthorityInformationAccessOID.CA_ISSUERS,
                    x509.UniformResourceIdentifier(urls.ca_issuers),
                )
            )
        if access:
            builder = builder.add_extension(x509.AuthorityInformationAccess(access), False)
    return builder


def authority_key_identifier(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    """What a certificate or CRL signed by ``issuer`` names it by: its SKI, else one derived
    from its key (imported CAs do not always carry an SKI)."""
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer.public_key()  # type: ignore[arg-type]
        )
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def self_signed(request: CertificateRequest, key: PrivateKey) -> x509.Certificate:
    """A root CA certificate."""
    builder = _builder(request, request.subject.name()).add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False
    )
    return builder.sign(key, signature_hash(key))


def issue(request: CertificateRequest, issuer: Issuer) -> x509.Certificate:
    """A certificate for ``request`` signed by ``issuer``."""
    builder = _builder(request, issuer.certificate.subject).add_extension(
        authority_key_identifier(issuer.certificate), critical=False
    )
    return builder.sign(issuer.key, signature_hash(issuer.key))
