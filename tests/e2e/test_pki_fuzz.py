"""Malformed PKI input never makes the gateway fail: CSRs, OCSP requests (POST and GET) and PEM
given to the CA and credential endpoints get a 4xx (OCSP: an OCSP malformedRequest), and the
gateway still answers afterwards."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from e2e.conftest import ADMIN
from e2e.gateway import Gateway
from e2e.pki_support import (
    OCSP_RESPONSE,
    add_device,
    issue_generated,
    pem_from_der,
    unhandled,
)

REFUSED = frozenset({400, 404, 409, 413, 422})
FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,  # the same inputs on every run: a CI failure is reproducible
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
DEVICE = "meter-7"


# -- seeds -----------------------------------------------------------------------------------

_KEY = ec.generate_private_key(ec.SECP256R1())
_KEY_PEM = _KEY.private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
).decode()


def _csr_der() -> bytes:
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DEVICE)]))
        .sign(_KEY, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )


def _ca_certificate(
    extensions: list[x509.ExtensionType] | None = None, *, ca: bool = True
) -> x509.Certificate:
    """A self-signed CA certificate for ``_KEY`` (an outside CA someone imports or trusts)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Fuzz Outside CA")])
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(_KEY.public_key())
        .serial_number(0x5EED_CA_0001)  # fixed, so mutated positions mean the same every run
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(_KEY.public_key()), False)
    )
    for extension in extensions or []:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(_KEY, hashes.SHA256())


CSR_DER = _csr_der()
CA_DER = _ca_certificate().public_bytes(serialization.Encoding.DER)
CA_PEM = pem_from_der(CA_DER, "CERTIFICATE")


def mutations(seed: bytes) -> st.SearchStrategy[bytes]:
    """Flip, cut, splice and repeat parts of a valid encoding: what a parser meets in the wild."""

    def flip(data: tuple[int, int]) -> bytes:
        position, mask = data
        out = bytearray(seed)
        out[position % len(seed)] ^= mask or 1
        return bytes(out)

    return st.one_of(
        st.tuples(st.integers(0, len(seed) - 1), st.integers(0, 255)).map(flip),
        st.integers(0, len(seed)).map(lambda n: seed[:n]),
        st.tuples(st.integers(0, len(seed)), st.binary(min_size=1, max_size=64)).map(
            lambda t: seed[: t[0]] + t[1] + seed[t[0] :]
        ),
        st.tuples(st.integers(0, len(seed) - 1), st.integers(1, 32)).map(
            lambda t: seed[: t[0]] + seed[t[0] : t[0] + t[1]] * 3 + seed[t[0] :]
        ),
        st.dictionaries(st.integers(0, len(seed) - 1), st.integers(1, 255), max_size=8).map(
            lambda masks: bytes(b ^ masks.get(i, 0) for i, b in enumerate(seed))
        ),
    )


def pem_inputs(seed_der: bytes, label: str) -> st.SearchStrategy[str]:
    """Random text, mutated PEM text, and well-formed PEM around mutated DER."""
    seed_pem = pem_from_der(seed_der, label).encode()
    return st.one_of(
        st.text(max_size=300),
        st.binary(max_size=600).map(lambda b: b.decode("latin-1")),
        mutations(seed_pem).map(lambda b: b.decode("latin-1")),
        mutations(seed_der).map(lambda b: pem_from_der(b, label)),
        st.just(pem_from_der(seed_der, label) * 2),
    )


# -- oracles: may this input be accepted? ----------------------------------------------------


def _parses(action: Callable[[], object]) -> bool:
    try:
        action()
    except Exception:  # noqa: BLE001 - whatever the library raises, the input is not acceptable
        return False
    return True


def _valid_csr(text: str) -> bool:
    """Would a strict reader grant this CSR (PEM or DER, as the API reads the JSON string)?"""

    def check() -> None:
        data = text.encode()
        pem = data.lstrip().startswith(b"-----")
        csr = x509.load_pem_x509_csr(data) if pem else x509.load_der_x509_csr(data)
        if not csr.is_signature_valid:
            raise ValueError("bad signature")
        cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if [c.value for c in cns] not in ([], [DEVICE]):
            raise ValueError("another common name")
        names = [e for e in csr.extensions if isinstance(e.value, x509.SubjectAlternativeName)]
        if names:
            raise ValueError("no names are allowed besides the device id")

    return _parses(check)


def _full_certificates(text: str) -> bool:
    def check() -> None:
        for cert in x509.load_pem_x509_certificates(text.encode()):
            cert.extensions  # noqa: B018 - parsing them is the point
            cert.public_key()
            cert.subject.rfc4514_string()

    return _parses(check)


def _ocsp_request(data: bytes) -> bool:
    return _parses(lambda: ocsp.load_der_ocsp_request(data).serial_number)


def _assert_ocsp_answer(response: httpx.Response, data: bytes) -> None:
    assert response.headers["content-type"] == OCSP_RESPONSE, response.headers
    parsed = ocsp.load_der_ocsp_response(response.content)
    if response.status_code == 200:
        assert _ocsp_request(data), f"200 for an input that is no OCSP request: {data!r}"
    else:
        assert response.status_code == 400, response.status_code
        assert parsed.response_status is ocsp.OCSPResponseStatus.MALFORMED_REQUEST


def _assert_alive(gateway: Gateway) -> None:
    with gateway.client(None) as anonymous:
        assert anonymous.get("/healthz").status_code == 200
    assert not unhandled(gateway), unhandled(gateway)


# -- the endpoints ---------------------------------------------------------------------------


def test_issuing_survives_random_and_mutated_csrs(gateway: Gateway) -> None:
    with gateway.client(ADMIN) as api:
        add_device(api, DEVICE)

    @FUZZ
    @given(
        st.one_of(
            st.text(max_size=200),
            mutations(pem_from_der(CSR_DER, "CERTIFICATE REQUEST").encode()).map(
                lambda b: b.decode("latin-1")
            ),
            mutations(CSR_DER).map(lambda b: pem_from_der(b, "CERTIFICATE REQUEST")),
            st.binary(max_size=20_000).map(lambda b: b.decode("latin-1")),
        )
    )
    def run(csr: str) -> None:
        with gateway.client(ADMIN) as api:
            answer = api.post(f"/v1/devices/{DEVICE}/certificates", json={"csr": csr})
        allowed = REFUSED | {201} if _valid_csr(csr) else REFUSED
        assert answer.status_code in allowed, (answer.status_code, answer.text, csr)
        if answer.status_code != 201:
            assert answer.headers["content-type"] == "application/problem+json"

    run()
    _assert_alive(gateway)


def _ocsp_request_der(gateway: Gateway) -> bytes:
    with gateway.client(ADMIN) as api:
        add_device(api, DEVICE)
        issued = issue_generated(api, DEVICE, "ec-p256")
    leaf = x509.load_pem_x509_certificate(issued["certificate_pem"].encode())
    issuer = x509.load_pem_x509_certificate(issued["chain_pem"].encode())
    return (
        ocsp.OCSPRequestBuilder()
        .add_certificate(leaf, issuer, hashes.SHA1())
        .add_extension(x509.OCSPNonce(b"0123456789abcdef"), critical=False)
        .build()
        .public_bytes(serialization.Encoding.DER)
    )


def test_ocsp_post_survives_random_and_mutated_requests(gateway: Gateway) -> None:
    valid = _ocsp_request_der(gateway)
    with gateway.client(None) as anonymous:
        first = anonymous.post(
            "/pki/ocsp", content=valid, headers={"content-type": "application/ocsp-request"}
        )
    assert first.status_code == 200
    assert ocsp.load_der_ocsp_response(first.content).certificate_status is (
        ocsp.OCSPCertStatus.GOOD
    )

    @FUZZ
    @given(st.one_of(st.binary(max_size=400), mutations(valid), st.just(valid * 2)))
    def run(data: bytes) -> None:
        with gateway.client(None) as anonymous:
            answer = anonymous.post(
                "/pki/ocsp", content=data, headers={"content-type": "application/ocsp-request"}
            )
        _assert_ocsp_answer(answer, data)

    run()
    _assert_alive(gateway)


def test_ocsp_get_survives_random_strings(gateway: Gateway) -> None:
    valid = base64.b64encode(_ocsp_request_der(gateway)).decode()

    def decoded(text: str) -> bytes:
        try:
            return base64.b64decode(text + "=" * (-len(text) % 4), validate=False)
        except (binascii.Error, ValueError):
            return b""

    @FUZZ
    @given(
        st.one_of(
            st.text(max_size=300),
            st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="),
            mutations(valid.encode()).map(lambda b: b.decode("latin-1")),
        ).filter(lambda s: s not in (".", ".."))
    )
    def run(text: str) -> None:
        with gateway.client(None) as anonymous:
            answer = anonymous.get(f"/pki/ocsp/{quote(text, safe='')}")
        _assert_ocsp_answer(answer, decoded(text))

    run()
    _assert_alive(gateway)


def test_ca_and_credential_endpoints_survive_random_pem(gateway: Gateway) -> None:
    with gateway.client(ADMIN) as api:
        add_device(api, DEVICE)

    @FUZZ
    @given(
        pem=pem_inputs(CA_DER, "CERTIFICATE"),
        key=st.one_of(st.just(_KEY_PEM), st.text(max_size=100)),
        endpoint=st.sampled_from(["import", "import-chain", "trust", "credential"]),
    )
    def run(pem: str, key: str, endpoint: str) -> None:
        body: dict[str, Any] = {
            "import": {"certificate_pem": pem, "key_pem": key},
            "import-chain": {"certificate_pem": CA_PEM, "key_pem": _KEY_PEM, "chain_pem": pem},
            "trust": {"certificate_pem": pem, "name": "fuzz"},
            "credential": {
                "id": "fuzz-x509",
                "kind": "x509",
                "certificate_pem": pem,
                "secret": key,
                "device_id": DEVICE,
            },
        }[endpoint]
        path = {
            "import": "/v1/ca/import",
            "import-chain": "/v1/ca/import",
            "trust": "/v1/ca/trust",
            "credential": "/v1/credentials",
        }[endpoint]
        with gateway.client(ADMIN) as api:
            answer = api.post(path, json=body)
        no_chain = endpoint == "import-chain" and not pem  # an empty chain is no chain
        allowed = REFUSED | {201} if no_chain or _full_certificates(pem) else REFUSED
        assert answer.status_code in allowed, (endpoint, answer.status_code, answer.text, pem)

    run()
    _assert_alive(gateway)


# -- certificates the library loads lazily, and cannot parse all the way -------------------


def _duplicate_extension_pem() -> str:
    """A CA certificate with two subjectKeyIdentifier extensions (RFC 5280 §4.2: invalid)."""
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(_KEY.public_key())
    der = _ca_certificate([aki]).public_bytes(serialization.Encoding.DER)
    aki_oid, ski_oid = bytes.fromhex("0603551d23"), bytes.fromhex("0603551d0e")
    assert der.count(aki_oid) == 1
    return pem_from_der(der.replace(aki_oid, ski_oid), "CERTIFICATE")


def _unknown_key_algorithm_pem() -> str:
    """A CA certificate whose SubjectPublicKeyInfo names an algorithm nobody knows."""
    ec_public_key = bytes.fromhex("06072a8648ce3d0201")  # id-ecPublicKey
    assert CA_DER.count(ec_public_key) == 1
    return pem_from_der(
        CA_DER.replace(ec_public_key, bytes.fromhex("06072a8648ce3d0209")), "CERTIFICATE"
    )


def _post_everywhere(gateway: Gateway, pem: str) -> dict[str, int]:
    attempts: dict[str, tuple[str, dict[str, Any]]] = {
        "POST /v1/ca/trust": ("/v1/ca/trust", {"certificate_pem": pem}),
        "POST /v1/ca/import": ("/v1/ca/import", {"certificate_pem": pem, "key_pem": _KEY_PEM}),
        "POST /v1/ca/import (as chain)": (
            "/v1/ca/import",
            {"certificate_pem": CA_PEM, "key_pem": _KEY_PEM, "chain_pem": pem},
        ),
        "POST /v1/credentials": (
            "/v1/credentials",
            {"id": "odd", "kind": "x509", "certificate_pem": pem, "secret": _KEY_PEM},
        ),
    }
    statuses: dict[str, int] = {}
    for what, (path, body) in attempts.items():
        with gateway.client(ADMIN) as api:  # a fresh connection: a 500 may close the old one
            statuses[what] = api.post(path, json=body).status_code
    return statuses


def _malformed_subject_pem() -> str:
    """A CA certificate whose subject CN is tagged as no string type (RELATIVE-OID)."""
    common_name = bytes.fromhex("0603550403") + b"\x0c"  # id-at-commonName, UTF8String
    position = CA_DER.rfind(common_name)  # the subject's (the issuer's comes first)
    assert position > CA_DER.find(common_name) >= 0
    end = position + len(common_name)
    return pem_from_der(CA_DER[: end - 1] + b"\x0d" + CA_DER[end:], "CERTIFICATE")


@pytest.mark.parametrize(
    "hostile",
    [_duplicate_extension_pem, _unknown_key_algorithm_pem, _malformed_subject_pem],
    ids=["duplicate-extension", "unknown-key-algorithm", "malformed-subject"],
)
def test_a_certificate_the_library_cannot_fully_parse_is_refused_everywhere(
    gateway: Gateway, hostile: Callable[[], str]
) -> None:
    """cryptography loads a certificate lazily: `load_pem_x509_certificates` succeeds and
    `.extensions`, `.public_key()` or `.subject` raise later. Every endpoint that takes a
    certificate must refuse such a one with 422, not fail (500) or keep it (201)."""
    pem = hostile()
    assert x509.load_pem_x509_certificates(pem.encode())  # it loads...
    assert not _full_certificates(pem)  # ...but cannot be read all the way
    statuses = _post_everywhere(gateway, pem)
    assert statuses == dict.fromkeys(statuses, 422), (statuses, unhandled(gateway))
    _assert_alive(gateway)
