"""Issuing from an outside CA made with openssl, and rotating the issuing CA: certificates keep
verifying, and revocation keeps reaching relying parties, across both."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509

from e2e.conftest import ADMIN
from e2e.gateway import Gateway, GatewayFactory
from e2e.pki_support import (
    add_device,
    certificate,
    fetch,
    fetch_public_pki,
    issue_csr,
    issue_generated,
    make_csr,
    make_outside_ca,
    ocsp,
    openssl,
    problem,
    revoke,
    verify,
    write_pem,
)


def _import(gateway: Gateway, certificate_pem: str, key_pem: str, chain_pem: str | None) -> int:
    with gateway.client(ADMIN) as api:
        answer = api.post(
            "/v1/ca/import",
            json={"certificate_pem": certificate_pem, "key_pem": key_pem, "chain_pem": chain_pem},
        )
    return answer.status_code


def test_an_imported_outside_ca_issues_certificates_its_root_verifies(
    gateway: Gateway, tmp_path: Path
) -> None:
    outside = make_outside_ca(tmp_path)
    with gateway.client(ADMIN) as api:
        imported = api.post(
            "/v1/ca/import",
            json={
                "certificate_pem": outside.intermediate.read_text(),
                "key_pem": outside.intermediate_key.read_text(),
                "chain_pem": outside.root.read_text(),
            },
        )
        assert imported.status_code == 201, imported.text
        ca = imported.json()
        assert (ca["role"], ca["active"], ca["key_held"]) == ("issuing", True, True)
        assert "key_pem" not in ca
        assert ca["subject"] == "CN=Outside outside Issuing,O=Outside outside"

        add_device(api, "meter-7")
        _, csr = make_csr(tmp_path, "meter-7", "/CN=meter-7")
        issued = issue_csr(api, "meter-7", csr)
        assert issued["certificate"]["issuer_id"] == ca["id"]
        listed = {c["id"]: c for c in api.get("/v1/ca").json()["items"]}
    assert listed[ca["id"]]["active"]
    parent = listed[ca["parent_id"]]
    assert (parent["role"], parent["key_held"]) == ("root", False)

    dev = write_pem(tmp_path / "dev.pem", issued["certificate_pem"])
    assert issued["chain_pem"] == outside.intermediate.read_text()
    accepted = verify(outside.root, outside.intermediate, dev)
    assert accepted.returncode == 0, accepted.stderr
    assert certificate(dev).issuer == certificate(outside.intermediate).subject

    # Revocation information now comes from the imported CA, and verifies under its root.
    crl = fetch(gateway, "/pki/crl.pem", tmp_path / "crl.pem")
    checked = verify(outside.root, outside.intermediate, dev, crl=crl)
    assert checked.returncode == 0, checked.stderr
    good = ocsp(gateway, outside.intermediate, outside.root, cert=dev)
    assert good.verified, good.stderr
    assert good.status_of(str(dev)) == "good"
    with gateway.client(ADMIN) as api:
        revoke(api, issued["certificate"]["serial"])
    assert ocsp(gateway, outside.intermediate, outside.root, cert=dev).status_of(str(dev)) == (
        "revoked"
    )


def test_an_import_whose_key_does_not_match_is_refused(gateway: Gateway, tmp_path: Path) -> None:
    outside = make_outside_ca(tmp_path)
    with gateway.client(ADMIN) as api:
        refused = api.post(
            "/v1/ca/import",
            json={
                "certificate_pem": outside.intermediate.read_text(),
                "key_pem": outside.root_key.read_text(),  # a key, but the root's
                "chain_pem": outside.root.read_text(),
            },
        )
        body = problem(refused, 422)
        assert "does not belong to the certificate" in body["detail"]
        assert body["errors"][0]["field"] == "key"
        # Nothing changed: fleetgate's own issuing CA is still the active one.
        active = [c for c in api.get("/v1/ca").json()["items"] if c["active"]]
        assert all(c["subject"].startswith("CN=fleetgate") for c in active), active


def test_an_import_whose_chain_did_not_sign_the_certificate_is_refused(
    gateway: Gateway, tmp_path: Path
) -> None:
    """The chain is published as the root devices trust (/pki/root.pem); one that does not
    anchor the imported CA would make every certificate issued from then on unverifiable."""
    outside = make_outside_ca(tmp_path)
    stranger = make_outside_ca(tmp_path, "stranger")
    status = _import(
        gateway,
        outside.intermediate.read_text(),
        outside.intermediate_key.read_text(),
        stranger.root.read_text(),
    )
    assert status == 422, f"an unrelated root was accepted as the chain ({status})"


def test_an_outside_ca_without_subject_key_identifier_cannot_break_the_gateway(
    gateway: Gateway, tmp_path: Path
) -> None:
    """RFC 5280 §4.2.1.2 requires the SKI in CA certificates, but older PKIs omit it. Import
    must refuse such a CA (422) or issue from it; it must not accept it and then fail on every
    certificate, every CRL and every start."""
    outside = make_outside_ca(tmp_path, ski=False)
    status = _import(
        gateway,
        outside.intermediate.read_text(),
        outside.intermediate_key.read_text(),
        outside.root.read_text(),
    )
    assert status in (201, 422)
    if status == 422:
        return
    gateway.stop()
    try:
        gateway.start()  # the first maintenance pass runs before gateway.started
        restarted = True
    except AssertionError:
        restarted = False
    if not restarted:
        crash = [e["line"] for e in gateway.events if e.get("event") == "unparsed"]
        pytest.fail(f"the gateway no longer starts after the import: {crash[-1:]}")
    with gateway.client(ADMIN) as api:
        add_device(api, "meter-7")
        issued = api.post(
            "/v1/devices/meter-7/certificates", json={"generate_key": {"algorithm": "ec-p256"}}
        )
        assert issued.status_code == 201, issued.text
        assert api.get("/pki/crl.der").status_code == 200


def test_rotation_issues_from_the_new_ca_and_still_answers_for_the_old_one(
    gateway: Gateway, tmp_path: Path
) -> None:
    with gateway.client(ADMIN) as api:
        add_device(api, "meter-7")
        before = issue_generated(api, "meter-7", "ec-p256")
        old = fetch_public_pki(gateway, tmp_path, prefix="old-")
        rotated = api.post("/v1/ca/rotate")
        assert rotated.status_code == 201, rotated.text
        new_ca = rotated.json()
        assert new_ca["id"] != before["certificate"]["issuer_id"]
        after = issue_generated(api, "meter-7", "ec-p256")
        assert after["certificate"]["issuer_id"] == new_ca["id"]
        cas = {c["id"]: c for c in api.get("/v1/ca").json()["items"]}
    assert cas[new_ca["id"]]["active"]
    assert not cas[before["certificate"]["issuer_id"]]["active"]
    assert cas[new_ca["id"]]["parent_id"] == cas[before["certificate"]["issuer_id"]]["parent_id"]

    old_dev = write_pem(tmp_path / "old-dev.pem", before["certificate_pem"])
    new_dev = write_pem(tmp_path / "new-dev.pem", after["certificate_pem"])
    new = fetch_public_pki(gateway, tmp_path, prefix="new-")
    assert new.root.read_bytes() == old.root.read_bytes()
    assert certificate(new_dev).issuer == certificate(new.issuing).subject
    assert certificate(new_dev).issuer != certificate(old_dev).issuer

    # /pki/ca.pem: both issuing CAs (newest first), then the root.
    bundle = fetch(gateway, "/pki/ca.pem", tmp_path / "ca.pem")
    subjects = [c.subject for c in x509.load_pem_x509_certificates(bundle.read_bytes())]
    assert subjects == [
        certificate(new.issuing).subject,
        certificate(old.issuing).subject,
        certificate(new.root).subject,
    ]
    for dev in (old_dev, new_dev):
        trusted = verify(new.root, bundle, dev)
        assert trusted.returncode == 0, (dev.name, trusted.stderr)

    # A certificate from before the rotation can still be revoked, and OCSP (asked with its
    # own issuer) and that issuer's CRL say so.
    with gateway.client(ADMIN) as api:
        revoke(api, before["certificate"]["serial"], "keyCompromise")
    answer = ocsp(gateway, old.issuing, new.root, cert=old_dev)
    assert answer.verified, answer.stderr
    assert answer.status_of(str(old_dev)) == "revoked"
    assert "Reason: keyCompromise" in answer.stdout
    still_good = ocsp(gateway, new.issuing, new.root, cert=new_dev)
    assert still_good.status_of(str(new_dev)) == "good"
    issuer_id = before["certificate"]["issuer_id"]
    old_crl = fetch(gateway, f"/pki/crl/{issuer_id}.der", tmp_path / "old-crl.der")
    rejected = verify(new.root, bundle, old_dev, crl=_pem_crl(old_crl))
    assert "certificate revoked" in rejected.stderr, rejected.stderr


def _pem_crl(der: Path) -> Path:
    out = der.with_suffix(".pem")
    openssl("crl", "-inform", "DER", "-in", der, "-out", out)
    return out


def test_the_published_crl_still_covers_certificates_of_the_previous_issuer(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    """docs/pki.md: brokers fetch /pki/crl.pem, and after a rotation "nothing issued before
    the rotation breaks". A relying party that checks CRLs needs one for every issuing CA
    that signed a valid certificate, so /pki/crl.pem must carry the previous issuer's too."""
    gateway = gateway_factory(FLEETGATE_ADMIN_TOKEN=ADMIN).start()
    with gateway.client(ADMIN) as api:
        add_device(api, "meter-7")
        kept = issue_generated(api, "meter-7", "ec-p256")
        lost = issue_generated(api, "meter-7", "ec-p256")
        assert api.post("/v1/ca/rotate").status_code == 201
        revoke(api, lost["certificate"]["serial"], "keyCompromise")
    pki = fetch_public_pki(gateway, tmp_path)
    bundle = fetch(gateway, "/pki/ca.pem", tmp_path / "ca.pem")
    kept_dev = write_pem(tmp_path / "kept.pem", kept["certificate_pem"])
    lost_dev = write_pem(tmp_path / "lost.pem", lost["certificate_pem"])

    good = verify(pki.root, bundle, kept_dev, crl=pki.crl)
    revoked = verify(pki.root, bundle, lost_dev, crl=pki.crl)
    assert good.returncode == 0, f"valid pre-rotation certificate refused: {good.stderr}"
    assert "certificate revoked" in revoked.stderr, revoked.stderr
