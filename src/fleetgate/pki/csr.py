"""Certificate signing requests: parsed with a size cap, signature checked, names extracted."""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.x509.oid import ExtensionOID, NameOID

from fleetgate.errors import InvalidRequest
from fleetgate.pki.keys import PublicKey, algorithm_of

MAX_CSR_BYTES = 16 * 1024


@dataclass(frozen=True)
class RequestedNames:
    common_name: str | None
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    uris: tuple[str, ...]
    emails: tuple[str, ...]


@dataclass(frozen=True)
class ParsedCsr:
    public_key: PublicKey
    names: RequestedNames


def parse_csr(data: bytes) -> ParsedCsr:
    """A checked CSR, or :class:`InvalidRequest` saying what is wrong with it."""
    try:
        return _parse(data)
    except InvalidRequest:
        raise
    except Exception as exc:  # noqa: BLE001 - the library raises many kinds on hostile DER
        raise InvalidRequest(
            f"not a usable CSR: {type(exc).__name__}: {exc}"[:300], field="csr"
        ) from None


def _parse(data: bytes) -> ParsedCsr:
    if len(data) > MAX_CSR_BYTES:
        raise InvalidRequest(f"a CSR is at most {MAX_CSR_BYTES} bytes", field="csr")
    try:
        csr = (
            x509.load_pem_x509_csr(data)
            if data.lstrip().startswith(b"-----")
            else x509.load_der_x509_csr(data)
        )
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise InvalidRequest(f"not a PKCS#10 CSR (PEM or DER): {exc}", field="csr") from None
    try:
        valid = csr.is_signature_valid
        public_key = csr.public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise InvalidRequest(f"the CSR cannot be checked: {exc}", field="csr") from None
    if not valid:
        raise InvalidRequest("the CSR's signature does not match its key", field="csr")
    algorithm_of(public_key)
    try:
        cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        common_name = str(cns[0].value) if cns else None
        if len(cns) > 1:
            raise InvalidRequest("the CSR has more than one common name", field="csr")
        try:
            san = csr.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
            general = san.value
            if not isinstance(general, x509.SubjectAlternativeName):
                raise InvalidRequest("the CSR's subjectAltName is malformed", field="csr")
            names = RequestedNames(
                common_name=common_name,
                dns_names=tuple(general.get_values_for_type(x509.DNSName)),
                ip_addresses=tuple(str(a) for a in general.get_values_for_type(x509.IPAddress)),
                uris=tuple(general.get_values_for_type(x509.UniformResourceIdentifier)),
                emails=tuple(general.get_values_for_type(x509.RFC822Name)),
            )
        except x509.ExtensionNotFound:
            names = RequestedNames(common_name, (), (), (), ())
    except (ValueError, TypeError, UnicodeError, UnsupportedAlgorithm) as exc:
        raise InvalidRequest(f"the CSR's names cannot be read: {exc}", field="csr") from None
    return ParsedCsr(public_key=public_key, names=names)
