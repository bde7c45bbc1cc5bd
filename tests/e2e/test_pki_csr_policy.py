"""Which names a device certificate may carry: the CSR is checked against the device and the
configured templates, and refusals say what was wrong and what is allowed."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from e2e.conftest import ADMIN
from e2e.gateway import Gateway, GatewayFactory
from e2e.pki_support import (
    add_device,
    certificate,
    issue_csr,
    make_csr,
    openssl,
    pem_from_der,
    problem,
    running_gateway,
    unhandled,
    write_pem,
)

DNS_TEMPLATE = "#{device_id}.dev.example.net"
URI_TEMPLATE = "https://devices.example.net/#{device_id}"
EC = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256")
RSA = ("-newkey", "rsa:2048")


@pytest.fixture(scope="module")
def templated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway whose name policy allows one DNS name and one URI per device."""
    with running_gateway(
        tmp_path_factory.mktemp("policy") / "data",
        FLEETGATE_ADMIN_TOKEN=ADMIN,
        FLEETGATE_PKI__DEVICE_DNS_TEMPLATES=f'["{DNS_TEMPLATE}"]',
        FLEETGATE_PKI__DEVICE_URI_TEMPLATES=f'["{URI_TEMPLATE}"]',
    ) as gateway:
        yield gateway


def _new_device(gateway: Gateway) -> str:
    device_id = f"meter-{secrets.token_hex(3)}"
    with gateway.client(ADMIN) as api:
        add_device(api, device_id)
    return device_id


def _allowed(device_id: str) -> str:
    return f"allowed: DNS:{device_id}.dev.example.net, URI:https://devices.example.net/{device_id}"


def test_a_csr_for_another_common_name_is_refused(templated: Gateway, tmp_path: Path) -> None:
    device_id = _new_device(templated)
    _, csr = make_csr(tmp_path, "other", "/CN=meter-elsewhere")
    with templated.client(ADMIN) as api:
        refused = api.post(f"/v1/devices/{device_id}/certificates", json={"csr": csr.read_text()})
        body = problem(refused, 422)
        assert body["type"].endswith(":invalid-request")
        assert "'meter-elsewhere'" in body["detail"]
        assert f"is not the device id '{device_id}'" in body["detail"]
        assert body["errors"] == [{"field": "csr", "message": body["detail"]}]
        assert api.get("/v1/certificates", params={"device_id": device_id}).json()["items"] == []


@pytest.mark.parametrize(
    ("asked", "named"),
    [
        ("DNS:evil.example.com", "DNS:evil.example.com"),
        ("IP:10.20.0.17", "IP:10.20.0.17"),
        ("email:meter@example.net", "email:meter@example.net"),
        ("URI:https://evil.example.com/meter", "URI:https://evil.example.com/meter"),
        ("DNS:{device}.dev.example.net,DNS:{device}.example.org", "DNS:{device}.example.org"),
    ],
    ids=["dns", "ip", "email", "uri", "one-allowed-one-not"],
)
def test_a_csr_asking_for_names_outside_the_policy_is_refused(
    templated: Gateway, tmp_path: Path, asked: str, named: str
) -> None:
    device_id = _new_device(templated)
    _, csr = make_csr(
        tmp_path,
        device_id,
        f"/CN={device_id}",
        subject_alt_name=asked.format(device=device_id),
    )
    with templated.client(ADMIN) as api:
        refused = api.post(f"/v1/devices/{device_id}/certificates", json={"csr": csr.read_text()})
    detail: str = problem(refused, 422)["detail"]
    assert f"the CSR asks for {named.format(device=device_id)}, outside" in detail
    assert detail.endswith(_allowed(device_id)), detail


@pytest.mark.parametrize("key_options", [EC, RSA], ids=["ec-p256", "rsa-2048"])
def test_a_csr_with_a_broken_signature_is_refused(
    templated: Gateway, tmp_path: Path, key_options: tuple[str, ...]
) -> None:
    device_id = _new_device(templated)
    _, csr = make_csr(tmp_path, device_id, f"/CN={device_id}", key_options=key_options)
    der = bytearray(
        x509.load_pem_x509_csr(csr.read_bytes()).public_bytes(serialization.Encoding.DER)
    )
    der[-1] ^= 0x01  # the last octet of the signature value
    broken = pem_from_der(bytes(der), "CERTIFICATE REQUEST")
    parsed = x509.load_pem_x509_csr(broken.encode())
    assert not parsed.is_signature_valid  # still a well-formed CSR, only its signature is off
    with templated.client(ADMIN) as api:
        refused = api.post(f"/v1/devices/{device_id}/certificates", json={"csr": broken})
    assert "signature" in problem(refused, 422)["detail"]


def test_a_csr_asking_for_exactly_the_templated_names_is_granted(
    templated: Gateway, tmp_path: Path
) -> None:
    device_id = _new_device(templated)
    dns, uri = f"{device_id}.dev.example.net", f"https://devices.example.net/{device_id}"
    _, csr = make_csr(
        tmp_path, device_id, f"/CN={device_id}", subject_alt_name=f"DNS:{dns},URI:{uri}"
    )
    with templated.client(ADMIN) as api:
        issued = issue_csr(api, device_id, csr)
    assert issued["certificate"]["sans"] == [f"DNS:{dns}", f"URI:{uri}"]
    dev = write_pem(tmp_path / "dev.pem", issued["certificate_pem"])
    san = certificate(dev).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [dns]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [uri]
    text = openssl("x509", "-in", dev, "-noout", "-ext", "subjectAltName").stdout
    assert f"DNS:{dns}" in text


def test_a_csr_without_names_gets_the_device_id_only(templated: Gateway, tmp_path: Path) -> None:
    device_id = _new_device(templated)
    _, csr = make_csr(tmp_path, device_id, f"/CN={device_id}")
    with templated.client(ADMIN) as api:
        issued = issue_csr(api, device_id, csr)
    dev = certificate(write_pem(tmp_path / "dev.pem", issued["certificate_pem"]))
    assert dev.subject.rfc4514_string() == f"CN={device_id}"
    assert issued["certificate"]["sans"] == []


def test_a_template_needing_a_missing_attribute_is_a_clear_422(
    gateway_factory: GatewayFactory,
) -> None:
    gateway = gateway_factory(
        FLEETGATE_ADMIN_TOKEN=ADMIN,
        FLEETGATE_PKI__DEVICE_DNS_TEMPLATES='["#{site}.sites.example.net"]',
    ).start()
    with gateway.client(ADMIN) as api:
        add_device(api, "meter-7")
        refused = api.post(
            "/v1/devices/meter-7/certificates", json={"generate_key": {"algorithm": "ec-p256"}}
        )
    assert "has no attribute site" in problem(refused, 422)["detail"]


def test_a_template_expanding_to_non_ascii_is_refused_not_a_500(
    gateway_factory: GatewayFactory,
) -> None:
    """Attribute values are free text (records.check_attributes); a DNS or URI template over
    one may expand to text that is no URI (or no A-label). Refusing it (422, naming it) or
    encoding it (RFC 3987 to RFC 3986) are both fine; an internal error is not."""
    gateway = gateway_factory(
        FLEETGATE_ADMIN_TOKEN=ADMIN,
        FLEETGATE_PKI__DEVICE_URI_TEMPLATES='["https://devices.example.net/#{site}/#{device_id}"]',
    ).start()
    with gateway.client(ADMIN) as api:
        add_device(api, "meter-7", attributes={"site": "東京"})
        answer = api.post(
            "/v1/devices/meter-7/certificates", json={"generate_key": {"algorithm": "ec-p256"}}
        )
    assert answer.status_code != 500, unhandled(gateway)
    assert answer.status_code in (201, 422), answer.text
    if answer.status_code == 422:
        assert "東京" in answer.json()["detail"]
    else:
        assert all(name.isascii() for name in answer.json()["certificate"]["sans"])
    with gateway.client(None) as anonymous:
        assert anonymous.get("/healthz").status_code == 200
