"""Certificate revocation lists (RFC 5280 §5): signed by the issuing CA, numbered, dated."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509

from fleetgate.pki.authority import Issuer, authority_key_identifier
from fleetgate.pki.keys import signature_hash


class RevocationReason(enum.StrEnum):
    """RFC 5280 reason codes, by their names in the RFC."""

    UNSPECIFIED = "unspecified"
    KEY_COMPROMISE = "keyCompromise"
    CA_COMPROMISE = "cACompromise"
    AFFILIATION_CHANGED = "affiliationChanged"
    SUPERSEDED = "superseded"
    CESSATION_OF_OPERATION = "cessationOfOperation"
    CERTIFICATE_HOLD = "certificateHold"
    PRIVILEGE_WITHDRAWN = "privilegeWithdrawn"

    def flag(self) -> x509.ReasonFlags:
        return {
            RevocationReason.UNSPECIFIED: x509.ReasonFlags.unspecified,
            RevocationReason.KEY_COMPROMISE: x509.ReasonFlags.key_compromise,
            RevocationReason.CA_COMPROMISE: x509.ReasonFlags.ca_compromise,
            RevocationReason.AFFILIATION_CHANGED: x509.ReasonFlags.affiliation_changed,
            RevocationReason.SUPERSEDED: x509.ReasonFlags.superseded,
            RevocationReason.CESSATION_OF_OPERATION: x509.ReasonFlags.cessation_of_operation,
            RevocationReason.CERTIFICATE_HOLD: x509.ReasonFlags.certificate_hold,
            RevocationReason.PRIVILEGE_WITHDRAWN: x509.ReasonFlags.privilege_withdrawn,
        }[self]


@dataclass(frozen=True)
class Revoked:
    serial: int
    revoked_at: datetime
    reason: RevocationReason


def build_crl(
    issuer: Issuer,
    revoked: Iterable[Revoked],
    *,
    number: int,
    this_update: datetime,
    next_update: datetime,
) -> x509.CertificateRevocationList:
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.certificate.subject)
        .last_update(this_update)
        .next_update(next_update)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(authority_key_identifier(issuer.certificate), critical=False)
    )
    for entry in revoked:
        item = (
            x509.RevokedCertificateBuilder()
            .serial_number(entry.serial)
            .revocation_date(entry.revoked_at)
        )
        # RFC 5280 §5.3.1: omit the reason code rather than say "unspecified".
        if entry.reason is not RevocationReason.UNSPECIFIED:
            item = item.add_extension(x509.CRLReason(entry.reason.flag()), critical=False)
        builder = builder.add_revoked_certificate(item.build())
    return builder.sign(issuer.key, signature_hash(issuer.key))
