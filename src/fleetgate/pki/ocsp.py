"""OCSP (RFC 6960): parse a request with a size cap, answer it with a delegated responder."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from fleetgate.errors import InvalidRequest
from fleetgate.pki.authority import Issuer
from fleetgate.pki.crl import RevocationReason
from fleetgate.pki.keys import signature_hash

MAX_REQUEST_BYTES = 8 * 1024
MAX_NONCE_BYTES = 32  # RFC 8954


class CertStatus(enum.StrEnum):
    GOOD = "good"
    REVOKED = "revoked"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class OcspQuery:
    serial: int
    issuer_name_hash: bytes
    issuer_key_hash: bytes
    hash_algorithm: hashes.HashAlgorithm
    nonce: bytes | None


@dataclass(frozen=True)
class Answer:
    status: CertStatus
    revoked_at: datetime | None = None
    reason: RevocationReason | None = None


def parse_request(data: bytes) -> OcspQuery:
    """A checked OCSP request for one certificate, or :class:`InvalidRequest`."""
    try:
        return _parse(data)
    except InvalidRequest:
        raise
    except Exception as exc:  # noqa: BLE001 - the library raises many kinds on hostile DER
        raise InvalidRequest(f"not a usable OCSP request: {type(exc).__name__}"[:300]) from None


def _parse(data: bytes) -> OcspQuery:
    if not data or len(data) > MAX_REQUEST_BYTES:
        raise InvalidRequest(f"an OCSP request is 1-{MAX_REQUEST_BYTES} bytes")
    try:
        request = ocsp.load_der_ocsp_request(data)
        nonce: bytes | None = None
        for extension in request.extensions:
            if isinstance(extension.value, x509.OCSPNonce):
                nonce = extension.value.nonce
        query = OcspQuery(
            serial=request.serial_number,
            issuer_name_hash=request.issuer_name_hash,
            issuer_key_hash=request.issuer_key_hash,
            hash_algorithm=request.hash_algorithm,
            nonce=nonce,
        )
    except (ValueError, TypeError, x509.UnsupportedGeneralNameType, UnsupportedAlgorithm) as exc:
        raise InvalidRequest(f"not a DER OCSP request for one certificate: {exc}") from None
    if not 0 < query.serial < 2**160:  # RFC 5280 §4.1.2.2: positive, at most 20 octets
        raise InvalidRequest("the serial number in the OCSP request is out of range")
    if nonce is not None and not 1 <= len(nonce) <= MAX_NONCE_BYTES:
        raise InvalidRequest(f"an OCSP nonce is 1-{MAX_NONCE_BYTES} bytes")
    return query


def issuer_hashes(issuer: x509.Certificate, algorithm: hashes.HashAlgorithm) -> tuple[bytes, bytes]:
    """(issuerNameHash, issuerKeyHash) of ``issuer`` under ``algorithm``, as a request has them."""
    name = hashes.Hash(algorithm)
    name.update(issuer.subject.public_bytes())
    # The key hash covers the BIT STRING inside the SPKI; the library computes it for a
    # request about any certificate the issuer signed, the issuer's own included.
    probe = ocsp.OCSPRequestBuilder().add_certificate(issuer, issuer, algorithm).build()
    return name.finalize(), probe.issuer_key_hash


def build_response(
    query: OcspQuery,
    answer: Answer,
    responder: Issuer,
    *,
    this_update: datetime,
    next_update: datetime,
) -> bytes:
    """A signed, successful response (DER) naming the responder by key hash."""
    builder = (
        ocsp.OCSPResponseBuilder()
        .add_response_by_hash(
            issuer_name_hash=query.issuer_name_hash,
            issuer_key_hash=query.issuer_key_hash,
            serial_number=query.serial,
            algorithm=query.hash_algorithm,
            cert_status={
                CertStatus.GOOD: ocsp.OCSPCertStatus.GOOD,
                CertStatus.REVOKED: ocsp.OCSPCertStatus.REVOKED,
                CertStatus.UNKNOWN: ocsp.OCSPCertStatus.UNKNOWN,
            }[answer.status],
            this_update=this_update,
            next_update=next_update,
            revocation_time=answer.revoked_at if answer.status is CertStatus.REVOKED else None,
            revocation_reason=(
                answer.reason.flag()
                if answer.status is CertStatus.REVOKED
                and answer.reason is not None
                and answer.reason is not RevocationReason.UNSPECIFIED
                else None
            ),
        )
        .responder_id(ocsp.OCSPResponderEncoding.HASH, responder.certificate)
        .certificates([responder.certificate])
    )
    if query.nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(query.nonce), critical=False)
    response = builder.sign(responder.key, signature_hash(responder.key))
    return response.public_bytes(serialization.Encoding.DER)


def unsuccessful(status: ocsp.OCSPResponseStatus) -> bytes:
    return ocsp.OCSPResponseBuilder.build_unsuccessful(status).public_bytes(
        serialization.Encoding.DER
    )
