"""What the PKI keeps: certificate authorities, issued certificates, CRLs, credentials."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography import x509

from fleetgate.errors import InvalidRequest
from fleetgate.pki.crl import RevocationReason
from fleetgate.pki.keys import KeyAlgorithm
from fleetgate.pki.profiles import Profile


class CaRole(enum.StrEnum):
    ROOT = "root"
    ISSUING = "issuing"
    TRUSTED = "trusted"  # an outside CA trusted for device authentication only


@dataclass(frozen=True)
class CertificateAuthority:
    id: str
    role: CaRole
    name: str
    certificate: x509.Certificate
    key_secret: str | None
    parent_id: str | None
    active: bool
    created_at: datetime

    @property
    def not_after(self) -> datetime:
        return self.certificate.not_valid_after_utc


@dataclass(frozen=True)
class IssuedCertificate:
    serial: str  # lowercase hex, no separators
    issuer_id: str
    profile: Profile
    subject: str
    sans: tuple[str, ...]
    device_id: str | None
    credential_id: str | None
    key_algorithm: KeyAlgorithm
    not_before: datetime
    not_after: datetime
    der: bytes
    revoked_at: datetime | None
    revocation_reason: RevocationReason | None
    renewed_by: str | None
    created_at: datetime

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


@dataclass(frozen=True)
class CrlRecord:
    issuer_id: str
    number: int
    this_update: datetime
    next_update: datetime
    der: bytes


class CredentialKind(enum.StrEnum):
    X509 = "x509"
    PASSWORD = "password"  # noqa: S105 - a kind's name
    PSK = "psk"
    HMAC = "hmac"
    API_TOKEN = "api_token"  # noqa: S105 - a kind's name


@dataclass(frozen=True)
class Credential:
    id: str
    kind: CredentialKind
    description: str
    device_id: str | None
    public: Mapping[str, Any]  # username, psk identity, hmac key id: never secret
    certificate_serial: str | None  # issued here
    certificate: bytes | None  # DER leaf, issued here or imported
    chain: str | None  # PEM chain up to (not including) a trust anchor
    not_after: datetime | None
    has_secret: bool
    exported_at: datetime | None
    created_at: datetime
    updated_at: datetime
    revision: int


def serial_hex(serial: int) -> str:
    return format(serial, "x")


def normalize_serial(text: str) -> str:
    """Any common spelling of a serial (``0A:1B…``, ``0x0a1b``, ``0A1B``) as stored: lowercase
    hex without leading zeros."""
    cleaned = text.strip().lower().removeprefix("0x").replace(":", "")
    if not cleaned or len(cleaned) > 64 or any(c not in "0123456789abcdef" for c in cleaned):
        raise InvalidRequest(f"{text[:80]!r} is not a certificate serial number (hex)")
    return cleaned.lstrip("0") or "0"
