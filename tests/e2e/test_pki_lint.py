"""Everything the CA publishes passes pkilint's RFC 5280 / RFC 6960 linters: no FATAL, ERROR
or WARNING finding (INFO and NOTICE are fine)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import ocsp as x509_ocsp

from e2e.conftest import ADMIN
from e2e.gateway import Gateway, GatewayFactory
from e2e.pki_support import (
    add_device,
    assert_lint_clean,
    certificate,
    fetch,
    fetch_public_pki,
    issue_csr,
    issue_generated,
    make_csr,
    ocsp,
    pkilint,
    revoke,
    running_gateway,
    write_pem,
)

DNS_TEMPLATE = "#{device_id}.dev.example.net"
URI_TEMPLATE = "https://devices.example.net/#{group}/#{device_id}"


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One gateway for the tests that only issue (each uses its own devices)."""
    with running_gateway(
        tmp_path_factory.mktemp("lint") / "data", FLEETGATE_ADMIN_TOKEN=ADMIN
    ) as gateway:
        yield gateway


def _device(api_gateway: Gateway) -> str:
    device_id = f"lint-{secrets.token_hex(3)}"
    with api_gateway.client(ADMIN) as api:
        add_device(api, device_id)
    return device_id


@pytest.mark.parametrize(
    ("source", "key_options"),
    [
        ("csr", ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256")),
        ("csr", ("-newkey", "rsa:2048")),
        ("ec-p256", ()),
        ("ec-p384", ()),
        ("rsa-2048", ()),
        ("ed25519", ()),
    ],
    ids=["csr-ec-p256", "csr-rsa-2048", "ec-p256", "ec-p384", "rsa-2048", "ed25519"],
)
def test_device_certificate_lints_clean(
    shared: Gateway, tmp_path: Path, source: str, key_options: tuple[str, ...]
) -> None:
    device_id = _device(shared)
    with shared.client(ADMIN) as api:
        if source == "csr":
            _, csr = make_csr(tmp_path, device_id, f"/CN={device_id}", key_options=key_options)
            issued = issue_csr(api, device_id, csr)
        else:
            issued = issue_generated(api, device_id, source)
            assert issued["certificate"]["key_algorithm"] == source
    dev = write_pem(tmp_path / "dev.pem", issued["certificate_pem"])
    assert certificate(dev).subject.rfc4514_string() == f"CN={device_id}"
    assert_lint_clean("lint_pkix_cert", dev)


def test_root_issuing_and_ocsp_responder_certificates_lint_clean(
    shared: Gateway, tmp_path: Path
) -> None:
    device_id = _device(shared)
    with shared.client(ADMIN) as api:
        issued = issue_generated(api, device_id, "ec-p256")
    dev = write_pem(tmp_path / "dev.pem", issued["certificate_pem"])
    pki = fetch_public_pki(shared, tmp_path)
    assert_lint_clean("lint_pkix_cert", pki.root)
    assert_lint_clean("lint_pkix_cert", pki.issuing)

    answer = ocsp(shared, pki.issuing, pki.root, cert=dev)
    (responder,) = x509_ocsp.load_der_ocsp_response(answer.response.read_bytes()).certificates
    responder_pem = write_pem(
        tmp_path / "responder.pem", responder.public_bytes(serialization.Encoding.PEM).decode()
    )
    assert_lint_clean("lint_pkix_cert", responder_pem)


def test_crl_lints_clean_empty_and_with_entries(gateway: Gateway, tmp_path: Path) -> None:
    empty = fetch(gateway, "/pki/crl.der", tmp_path / "empty.crl")
    assert not list(x509.load_der_x509_crl(empty.read_bytes()))
    assert_lint_clean("lint_crl", empty, "-t", "CRL", "-p", "PKIX")

    with gateway.client(ADMIN) as api:
        add_device(api, "meter-7")
        for algorithm, reason in (
            ("ec-p256", "keyCompromise"),
            ("rsa-2048", "unspecified"),  # RFC 5280: no reasonCode entry extension then
            ("ed25519", "cessationOfOperation"),
        ):
            serial = issue_generated(api, "meter-7", algorithm)["certificate"]["serial"]
            revoke(api, serial, reason)
    listed = fetch(gateway, "/pki/crl.der", tmp_path / "listed.crl")
    assert len(list(x509.load_der_x509_crl(listed.read_bytes()))) == 3
    assert_lint_clean("lint_crl", listed, "-t", "CRL", "-p", "PKIX")
    pem = fetch(gateway, "/pki/crl.pem", tmp_path / "listed.pem")
    blocks = pem.read_text().split("-----END X509 CRL-----")
    crls = [b + "-----END X509 CRL-----\n" for b in blocks if "BEGIN X509 CRL" in b]
    assert len(crls) == 2  # the issuing CA's and the root's
    for n, text in enumerate(crls):
        one = tmp_path / f"listed-{n}.pem"
        one.write_text(text.lstrip())
        assert_lint_clean("lint_crl", one, "-t", "CRL", "-p", "PKIX")


def test_ocsp_responses_lint_clean(shared: Gateway, tmp_path: Path) -> None:
    device_id = _device(shared)
    with shared.client(ADMIN) as api:
        issued = issue_generated(api, device_id, "ec-p256")
    dev = write_pem(tmp_path / "dev.pem", issued["certificate_pem"])
    pki = fetch_public_pki(shared, tmp_path)

    good = ocsp(shared, pki.issuing, pki.root, cert=dev)
    no_nonce = ocsp(shared, pki.issuing, pki.root, cert=dev, options=["-no_nonce"])
    unknown = ocsp(shared, pki.issuing, pki.root, serial="0x" + "17" * 19)
    with shared.client(ADMIN) as api:
        revoke(api, issued["certificate"]["serial"], "keyCompromise")
    revoked = ocsp(shared, pki.issuing, pki.root, cert=dev)
    assert revoked.status_of(str(dev)) == "revoked"
    for answer in (good, no_nonce, unknown, revoked):
        assert answer.verified, answer.stderr
        assert_lint_clean("lint_ocsp_response", answer.response)


def test_names_from_templates_lint_clean(gateway_factory: GatewayFactory, tmp_path: Path) -> None:
    gateway = gateway_factory(
        FLEETGATE_ADMIN_TOKEN=ADMIN,
        FLEETGATE_PKI__DEVICE_DNS_TEMPLATES=f'["{DNS_TEMPLATE}"]',
        FLEETGATE_PKI__DEVICE_URI_TEMPLATES=f'["{URI_TEMPLATE}"]',
    ).start()
    with gateway.client(ADMIN) as api:
        add_device(api, "meter-7")
        issued = issue_generated(api, "meter-7", "ec-p256")
    assert issued["certificate"]["sans"] == [
        "DNS:meter-7.dev.example.net",
        "URI:https://devices.example.net/default/meter-7",
    ]
    assert_lint_clean("lint_pkix_cert", write_pem(tmp_path / "dev.pem", issued["certificate_pem"]))


def test_a_device_id_that_is_no_dns_label_never_becomes_a_dns_name(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    """Device ids may contain ':' (records.DEVICE_ID_RE); expanded into a DNS template they must
    not yield a dNSName outside RFC 5280's preferred name syntax (letters, digits, hyphens):
    refuse (422) or leave the name out, but never sign it."""
    gateway = gateway_factory(
        FLEETGATE_ADMIN_TOKEN=ADMIN, FLEETGATE_PKI__DEVICE_DNS_TEMPLATES=f'["{DNS_TEMPLATE}"]'
    ).start()
    with gateway.client(ADMIN) as api:
        add_device(api, "plant:meter-7")
        answer = api.post(
            "/v1/devices/plant:meter-7/certificates",
            json={"generate_key": {"algorithm": "ec-p256"}},
        )
    assert answer.status_code in (201, 422), answer.text
    if answer.status_code == 201:
        signed = answer.json()
        dev = write_pem(tmp_path / "dev.pem", signed["certificate_pem"])
        severe = [f for f in pkilint("lint_pkix_cert", dev) if f.severity in ("FATAL", "ERROR")]
        assert not severe, f"signed {signed['certificate']['sans']}: {severe}"
    else:
        assert "plant:meter-7.dev.example.net" in answer.json()["detail"]
