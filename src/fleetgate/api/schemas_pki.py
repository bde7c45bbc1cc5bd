"""Wire shapes of the CA, certificate and credential endpoints."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pydantic import BaseModel, Field

from fleetgate.api.schemas import DeviceOut, Strict
from fleetgate.pki.records import CertificateAuthority, Credential, IssuedCertificate
from fleetgate.services.lifecycle import InventoryItem

KeyAlgorithmName = Literal["ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "rsa-4096", "ed25519"]


def _pem(der: bytes) -> str:
    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM).decode()


class CaOut(BaseModel):
    id: str
    role: str
    name: str
    subject: str
    active: bool
    key_held: bool
    parent_id: str | None
    not_before: datetime
    not_after: datetime
    certificate_pem: str

    @classmethod
    def of(cls, ca: CertificateAuthority) -> CaOut:
        return cls(
            id=ca.id,
            role=ca.role.value,
            name=ca.name,
            subject=ca.certificate.subject.rfc4514_string(),
            active=ca.active,
            key_held=ca.key_secret is not None,
            parent_id=ca.parent_id,
            not_before=ca.certificate.not_valid_before_utc,
            not_after=ca.not_after,
            certificate_pem=ca.certificate.public_bytes(serialization.Encoding.PEM).decode(),
        )


class CaList(BaseModel):
    items: list[CaOut]


class CaImportIn(Strict):
    certificate_pem: str = Field(max_length=65536)
    key_pem: str = Field(max_length=65536, description="Write-only; sealed at rest.")
    chain_pem: str | None = Field(default=None, max_length=65536)


class CaTrustIn(Strict):
    certificate_pem: str = Field(max_length=65536)
    name: str = Field(default="", max_length=200)


class CertificateOut(BaseModel):
    serial: str
    issuer_id: str
    profile: str
    subject: str
    sans: list[str]
    device_id: str | None
    credential_id: str | None
    key_algorithm: str
    not_before: datetime
    not_after: datetime
    status: Literal["valid", "revoked", "expired"]
    revoked_at: datetime | None
    revocation_reason: str | None
    renewed_by: str | None
    certificate_pem: str

    @classmethod
    def of(cls, c: IssuedCertificate, now: datetime) -> CertificateOut:
        status: Literal["valid", "revoked", "expired"] = (
            "revoked" if c.revoked else "expired" if c.not_after <= now else "valid"
        )
        return cls(
            serial=c.serial,
            issuer_id=c.issuer_id,
            profile=c.profile.value,
            subject=c.subject,
            sans=list(c.sans),
            device_id=c.device_id,
            credential_id=c.credential_id,
            key_algorithm=c.key_algorithm.value,
            not_before=c.not_before,
            not_after=c.not_after,
            status=status,
            revoked_at=c.revoked_at,
            revocation_reason=c.revocation_reason.value if c.revocation_reason else None,
            renewed_by=c.renewed_by,
            certificate_pem=_pem(c.der),
        )


class CertificatePage(BaseModel):
    items: list[CertificateOut]
    next_cursor: str | None


class GenerateKeyIn(Strict):
    algorithm: KeyAlgorithmName = "ec-p256"
    credential_id: str | None = Field(
        default=None, description="Default: device-<device id>. The key stays sealed in it."
    )


class IssueIn(Strict):
    csr: str | None = Field(default=None, max_length=16384, description="PKCS#10, PEM.")
    generate_key: GenerateKeyIn | None = None
    lifetime_days: int | None = Field(default=None, ge=1, le=3650)


class GatewayIssueIn(Strict):
    credential_id: str = Field(max_length=128, examples=["gateway-mqtt-server"])
    profile: Literal["gateway_server", "upstream_client"]
    common_name: str = Field(max_length=64)
    dns_names: list[str] = Field(default_factory=list, max_length=100)
    ip_addresses: list[str] = Field(default_factory=list, max_length=100)
    algorithm: KeyAlgorithmName = "ec-p256"
    lifetime_days: int | None = Field(default=None, ge=1, le=825)


class IssuedOut(BaseModel):
    certificate: CertificateOut
    certificate_pem: str
    chain_pem: str = Field(description="Issuing CA; the root is at /pki/root.pem.")
    credential_id: str | None


class RevokeIn(Strict):
    reason: str = Field(
        default="unspecified",
        description="RFC 5280 reason: unspecified, keyCompromise, cACompromise, "
        "affiliationChanged, superseded, cessationOfOperation, certificateHold, "
        "privilegeWithdrawn",
    )


class InventoryOut(BaseModel):
    kind: str
    id: str
    subject: str
    not_after: datetime
    expires_in_s: float
    device_id: str | None
    credential_id: str | None
    profile: str | None
    renews_automatically: bool

    @classmethod
    def of(cls, item: InventoryItem, now: datetime) -> InventoryOut:
        return cls(
            kind=item.kind.value,
            id=item.id,
            subject=item.subject,
            not_after=item.not_after,
            expires_in_s=(item.not_after - now).total_seconds(),
            device_id=item.device_id,
            credential_id=item.credential_id,
            profile=item.profile,
            renews_automatically=item.renews_automatically,
        )


class InventoryList(BaseModel):
    items: list[InventoryOut]


class CredentialIn(Strict):
    id: str = Field(max_length=128, examples=["aws-440101234567890"])
    kind: Literal["x509", "password", "psk", "hmac", "api_token"]
    description: str = Field(default="", max_length=1000)
    device_id: str | None = None
    public: dict[str, str] = Field(
        default_factory=dict,
        description="Non-secret parts: username (password), identity (psk), key_id (hmac).",
    )
    secret: str | None = Field(
        default=None,
        max_length=16384,
        description="Write-only, sealed: password, PSK (hex), HMAC key, token, or private key PEM.",
    )
    certificate_pem: str | None = Field(default=None, max_length=65536)
    chain_pem: str | None = Field(default=None, max_length=65536)


class CredentialPatchIn(Strict):
    description: str | None = Field(default=None, max_length=1000)
    public: dict[str, str] | None = None
    secret: str | None = Field(default=None, max_length=16384, description="Replaces the secret.")


class CredentialOut(BaseModel):
    id: str
    kind: str
    description: str
    device_id: str | None
    public: dict[str, Any]
    has_secret: bool
    certificate_serial: str | None
    certificate_pem: str | None
    chain_pem: str | None
    not_after: datetime | None
    exported_at: datetime | None
    created_at: datetime
    updated_at: datetime
    revision: int

    @classmethod
    def of(cls, c: Credential) -> CredentialOut:
        return cls(
            id=c.id,
            kind=c.kind.value,
            description=c.description,
            device_id=c.device_id,
            public=dict(c.public),
            has_secret=c.has_secret,
            certificate_serial=c.certificate_serial,
            certificate_pem=_pem(c.certificate) if c.certificate else None,
            chain_pem=c.chain,
            not_after=c.not_after,
            exported_at=c.exported_at,
            created_at=c.created_at,
            updated_at=c.updated_at,
            revision=c.revision,
        )


class CredentialPage(BaseModel):
    items: list[CredentialOut]
    next_cursor: str | None


class ExportIn(Strict):
    format: Literal["pem", "pkcs12"] = "pem"
    password: str | None = Field(default=None, max_length=1024)


class ResolveOut(BaseModel):
    template: str
    expanded: str
    credential: CredentialOut | None


class ReplaceIn(Strict):
    with_: str = Field(alias="with", max_length=128, description="The new device's id.")
    name: str | None = Field(default=None, max_length=200)
    addresses: list[str] | None = Field(
        default=None, description="The new device's addresses (default: the old one's)."
    )
    attributes: dict[str, str] | None = Field(
        default=None, description="Override moved attributes, e.g. the new unit's serial."
    )


class ReplaceOut(BaseModel):
    old: DeviceOut
    new: DeviceOut
    revoked: list[str]
    reissued: list[dict[str, str]]
    rebound: list[str]
