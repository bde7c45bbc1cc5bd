"""Revocation as relying parties see it: `openssl verify -crl_check` against the published CRL,
and `openssl ocsp` against the responder (POST and GET)."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from urllib.parse import quote

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import ocsp as x509_ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID

from e2e.conftest import ADMIN
from e2e.gateway import Gateway
from e2e.pki_support import (
    OCSP_RESPONSE,
    add_device,
    certificate,
    fetch_public_pki,
    issue_csr,
    issue_generated,
    make_csr,
    ocsp,
    openssl,
    revoke,
    serial_of,
    verify,
    write_pem,
)


def _crl_distribution_point(cert: x509.Certificate) -> str:
    points = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert len(points) == 1
    assert points[0].full_name is not None
    (name,) = points[0].full_name
    assert isinstance(name, x509.UniformResourceIdentifier)
    return name.value


def test_openssl_verify_accepts_a_fresh_certificate_and_rejects_it_once_revoked(
    gateway: Gateway, tmp_path: Path
) -> None:
    with gateway.client(ADMIN) as api:
        add_device(api, "meter-7")
        _, csr = make_csr(tmp_path, "meter-7", "/CN=meter-7")
        issued = issue_csr(api, "meter-7", csr)
        dev = write_pem(tmp_path / "dev.pem", issued["certificate_pem"])
        pki = fetch_public_pki(gateway, tmp_path)

        accepted = verify(pki.root, pki.issuing, dev, crl=pki.crl)
        assert accepted.returncode == 0, accepted.stderr
        assert accepted.stdout.strip() == f"{dev}: OK"

        revoke(api, issued["certificate"]["serial"], "keyCompromise")

    stale = verify(pki.root, pki.issuing, dev, crl=pki.crl)
    assert stale.returncode == 0, "the CRL fetched before the revocation does not list it"
    fresh = fetch_public_pki(gateway, tmp_path, prefix="after-")
    rejected = verify(fresh.root, fresh.issuing, dev, crl=fresh.crl)
    assert rejected.returncode != 0
    assert "certificate revoked" in rejected.stderr, rejected.stderr

    # /pki/crl.pem, /pki/crl.der and the distribution point written in the certificate are
    # one and the same CRL, and it names the serial with its reason.
    with gateway.client(None) as anonymous:
        der = anonymous.get("/pki/crl.der")
        assert der.status_code == 200
        assert der.headers["content-type"] == "application/pkix-crl"
        assert "max-age=" in der.headers["cache-control"]
        point = _crl_distribution_point(certificate(dev))
        assert point.startswith(f"{gateway.url}/pki/crl/")
        by_point = anonymous.get(point)
        assert by_point.status_code == 200
    from_pem = x509.load_pem_x509_crl(fresh.crl.read_bytes())
    assert from_pem.public_bytes(serialization.Encoding.DER) == der.content == by_point.content
    entry = from_pem.get_revoked_certificate_by_serial_number(certificate(dev).serial_number)
    assert entry is not None
    reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    assert reason is x509.ReasonFlags.key_compromise
    issuer = certificate(fresh.issuing)
    assert from_pem.issuer == issuer.subject
    assert from_pem.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]
    listed = openssl("crl", "-in", fresh.crl, "-noout", "-text").stdout.replace(" 0", " ")
    assert f"Serial Number: {serial_of(dev).upper()}" in listed


def test_ocsp_says_good_then_revoked_with_reason_and_unknown_for_strangers(
    gateway: Gateway, tmp_path: Path
) -> None:
    with gateway.client(ADMIN) as api:
        add_device(api, "meter-7")
        _, csr = make_csr(tmp_path, "meter-7", "/CN=meter-7")
        issued = issue_csr(api, "meter-7", csr)
        dev = write_pem(tmp_path / "dev.pem", issued["certificate_pem"])
        pki = fetch_public_pki(gateway, tmp_path)

        aia = certificate(dev).extensions.get_extension_for_class(x509.AuthorityInformationAccess)
        ocsp_urls = [
            d.access_location.value
            for d in aia.value
            if d.access_method == AuthorityInformationAccessOID.OCSP
        ]
        assert ocsp_urls == [f"{gateway.url}/pki/ocsp"]

        good = ocsp(gateway, pki.issuing, pki.root, cert=dev)
        assert good.verified, good.stderr
        assert good.status_of(str(dev)) == "good"
        with_sha256 = ocsp(gateway, pki.issuing, pki.root, options=["-sha256"], cert=dev)
        assert with_sha256.verified, with_sha256.stderr
        assert with_sha256.status_of(str(dev)) == "good"

        revoke(api, issued["certificate"]["serial"], "keyCompromise")

    revoked = ocsp(gateway, pki.issuing, pki.root, cert=dev)
    assert revoked.verified, revoked.stderr
    assert revoked.status_of(str(dev)) == "revoked"
    assert "Reason: keyCompromise" in revoked.stdout
    assert "Revocation Time:" in revoked.stdout

    stranger = "0x" + "5a" * 19  # a serial this CA never issued
    unknown = ocsp(gateway, pki.issuing, pki.root, serial=stranger)
    assert unknown.verified, unknown.stderr
    assert unknown.status_of(stranger) == "unknown"

    # The responder is a delegated signer of the issuing CA: OCSPSigning + ocsp-nocheck.
    parsed = x509_ocsp.load_der_ocsp_response(good.response.read_bytes())
    assert parsed.response_status is x509_ocsp.OCSPResponseStatus.SUCCESSFUL
    (responder,) = parsed.certificates
    eku = responder.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.OCSP_SIGNING in eku
    nocheck = responder.extensions.get_extension_for_class(x509.OCSPNoCheck)
    assert nocheck.oid.dotted_string == "1.3.6.1.5.5.7.48.1.5"
    assert not responder.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    responder.verify_directly_issued_by(certificate(pki.issuing))
    assert parsed.serial_number == certificate(dev).serial_number


def test_ocsp_get_form_answers_like_post(gateway: Gateway, tmp_path: Path) -> None:
    with gateway.client(ADMIN) as api:
        add_device(api, "meter-7")
        _, csr = make_csr(tmp_path, "meter-7", "/CN=meter-7")
        dev = write_pem(tmp_path / "dev.pem", issue_csr(api, "meter-7", csr)["certificate_pem"])
    pki = fetch_public_pki(gateway, tmp_path)
    request = tmp_path / "req.der"
    # RFC 5019 style: no nonce, so the answer is cacheable.
    openssl("ocsp", "-issuer", pki.issuing, "-cert", dev, "-no_nonce", "-reqout", request)
    encoded = quote(base64.b64encode(request.read_bytes()).decode(), safe="")

    with gateway.client(None) as anonymous:
        answer = anonymous.get(f"/pki/ocsp/{encoded}")
    assert answer.status_code == 200
    assert answer.headers["content-type"] == OCSP_RESPONSE
    assert answer.headers["cache-control"].startswith("public, max-age=")
    response = tmp_path / "get-response.der"
    response.write_bytes(answer.content)

    checked = openssl(
        "ocsp", "-respin", response, "-issuer", pki.issuing, "-cert", dev, "-CAfile", pki.root
    )
    assert "Response verify OK" in checked.stderr, checked.stderr
    assert f"{dev}: good" in checked.stdout
    parsed = x509_ocsp.load_der_ocsp_response(answer.content)
    assert parsed.certificate_status is x509_ocsp.OCSPCertStatus.GOOD
    assert parsed.serial_number == certificate(dev).serial_number


def test_a_certificate_is_found_by_the_serial_spellings_revoke_accepts(
    gateway: Gateway, tmp_path: Path
) -> None:
    """POST /v1/certificates/{serial}/revoke accepts a serial with leading zeros (what
    `openssl x509 -serial` prints for one serial in eight: it pads to whole octets); GET
    /v1/certificates/{serial} must find the certificate by the same spelling."""
    with gateway.client(ADMIN) as api:
        add_device(api, "meter-7")
        _, csr = make_csr(tmp_path, "meter-7", "/CN=meter-7")
        issued = issue_csr(api, "meter-7", csr)
        serial: str = issued["certificate"]["serial"]
        padded = "0" + serial.upper()  # a leading zero, as openssl prints one serial in eight
        assert api.get(f"/v1/certificates/{serial.upper()}").status_code == 200
        found = api.get(f"/v1/certificates/{padded}")
        assert found.status_code == 200, (
            f"GET /v1/certificates/{padded} -> {found.status_code}, though revoke takes it"
        )
        assert found.json()["serial"] == serial
        assert api.post(f"/v1/certificates/{padded}/revoke", json={}).status_code == 200


def _serials_in_metrics(text: str) -> set[str]:
    return set(
        re.findall(r'fleetgate_certificate_not_after_timestamp_seconds\{[^}]*id="([^"]+)"', text)
    )


def _gauge(text: str, name: str) -> float:
    found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert found is not None, f"{name} not in /metrics"
    return float(found.group(1))


def test_metrics_list_what_nobody_renews_and_count_what_fleetgate_renews(
    gateway: Gateway, tmp_path: Path
) -> None:
    """A series per certificate fleetgate renews by itself would grow with the fleet (and be
    renamed at every renewal): those are counted while on schedule; what fleetgate cannot
    renew is listed, each with its end of validity."""
    with gateway.client(None) as anonymous:
        before = anonymous.get("/metrics").text
    with gateway.client(ADMIN) as api:
        for device in ("metrics-held", "metrics-csr"):
            add_device(api, device)
        held = issue_generated(api, "metrics-held", "ec-p256")
        _, csr = make_csr(tmp_path, "metrics-csr", "/CN=metrics-csr")
        from_csr = issue_csr(api, "metrics-csr", csr)
    with gateway.client(None) as anonymous:
        after = anonymous.get("/metrics").text

    listed = _serials_in_metrics(after)
    assert from_csr["certificate"]["serial"] in listed
    assert held["certificate"]["serial"] not in listed
    on_time = "fleetgate_certificates_renewing_on_time"
    assert _gauge(after, on_time) == _gauge(before, on_time) + 1
    assert _gauge(after, "fleetgate_certificate_renewals_overdue") == 0
