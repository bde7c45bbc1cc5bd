"""The PKI's wire parsers: garbage gives a parse or InvalidRequest, never anything else."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetgate.errors import InvalidRequest
from fleetgate.pki.csr import MAX_CSR_BYTES, parse_csr
from fleetgate.pki.ocsp import MAX_REQUEST_BYTES, parse_request

_KEY = ec.generate_private_key(ec.SECP256R1())


def _csr(names: list[x509.GeneralName] | None = None, cn: str = "meter-7") -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(_KEY, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def _self_signed() -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "issuer")])
    from datetime import UTC, datetime, timedelta

    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(_KEY.public_key())
        .serial_number(7)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(_KEY, hashes.SHA256())
    )


VALID_CSR = _csr([x509.DNSName("meter-7.example.net")])
_ISSUER = _self_signed()
VALID_OCSP = (
    ocsp.OCSPRequestBuilder()
    .add_certificate(_ISSUER, _ISSUER, hashes.SHA256())
    .add_extension(x509.OCSPNonce(b"0123456789abcdef"), critical=False)
    .build()
    .public_bytes(serialization.Encoding.DER)
)


def _mutations(seed: bytes) -> st.SearchStrategy[bytes]:
    """Flip, cut or splice the valid encoding: the inputs a parser meets in the wild."""
    return st.one_of(
        st.binary(max_size=4096),
        st.integers(0, len(seed) - 1).flatmap(
            lambda i: st.integers(0, 255).map(lambda b: seed[:i] + bytes([b]) + seed[i + 1 :])
        ),
        st.integers(0, len(seed)).map(lambda i: seed[:i]),
        st.tuples(st.integers(0, len(seed)), st.binary(max_size=64)).map(
            lambda t: seed[: t[0]] + t[1] + seed[t[0] :]
        ),
    )


def test_valid_csr_parses_with_its_names() -> None:
    parsed = parse_csr(VALID_CSR)
    assert parsed.names.common_name == "meter-7"
    assert parsed.names.dns_names == ("meter-7.example.net",)
    pem = x509.load_der_x509_csr(VALID_CSR).public_bytes(serialization.Encoding.PEM)
    assert parse_csr(pem).names == parsed.names


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_mutations(VALID_CSR))
def test_csr_parser_returns_or_refuses(data: bytes) -> None:
    try:
        parsed = parse_csr(data)
    except InvalidRequest as exc:
        refusal = exc
    else:
        assert parsed.public_key is not None
        return
    assert refusal.field == "csr"


def test_csr_with_a_broken_signature_is_refused() -> None:
    tampered = bytearray(VALID_CSR)
    tampered[-5] ^= 0x01  # inside the signature BIT STRING
    with pytest.raises(InvalidRequest, match="signature"):
        parse_csr(bytes(tampered))


def test_oversize_csr_is_refused_before_parsing() -> None:
    with pytest.raises(InvalidRequest, match=str(MAX_CSR_BYTES)):
        parse_csr(b"-" * (MAX_CSR_BYTES + 1))


def test_valid_ocsp_request_parses() -> None:
    query = parse_request(VALID_OCSP)
    assert query.serial == 7
    assert query.nonce == b"0123456789abcdef"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_mutations(VALID_OCSP))
def test_ocsp_parser_returns_or_refuses(data: bytes) -> None:
    try:
        query = parse_request(data)
    except InvalidRequest:
        return
    assert 0 < query.serial < 2**160
    assert query.nonce is None or 1 <= len(query.nonce) <= 32


def test_empty_and_oversize_ocsp_requests_are_refused() -> None:
    for data in (b"", b"\x30" * (MAX_REQUEST_BYTES + 1)):
        try:
            parse_request(data)
        except InvalidRequest:
            continue
        raise AssertionError(f"{len(data)}-byte OCSP request accepted")
