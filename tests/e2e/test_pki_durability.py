"""An issued certificate and a revocation are durable once the API has answered: `kill -9`
right after, restart on the same data directory, and the CA still knows."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509

from e2e.conftest import ADMIN
from e2e.gateway import Gateway, GatewayFactory
from e2e.pki_support import (
    add_device,
    fetch_public_pki,
    issue_csr,
    make_csr,
    ocsp,
    revoke,
    verify,
    write_pem,
)


def _restart(gateway_factory: GatewayFactory, killed: Gateway) -> Gateway:
    return gateway_factory(data_dir=killed.data_dir, FLEETGATE_ADMIN_TOKEN=ADMIN).start()


def test_issuance_and_revocation_survive_kill_9(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    first = gateway_factory(FLEETGATE_ADMIN_TOKEN=ADMIN).start()
    with first.client(ADMIN) as api:
        add_device(api, "meter-7")
        pki = fetch_public_pki(first, tmp_path)  # the CA itself must survive too
        _, csr = make_csr(tmp_path, "meter-7", "/CN=meter-7")
        issued = issue_csr(api, "meter-7", csr)
    first.kill9()  # at once: no drain, no shutdown hook

    serial: str = issued["certificate"]["serial"]
    dev = write_pem(tmp_path / "dev.pem", issued["certificate_pem"])
    second = _restart(gateway_factory, first)
    with second.client(ADMIN) as api:
        listed = api.get("/v1/certificates", params={"device_id": "meter-7"}).json()["items"]
        assert [(c["serial"], c["status"]) for c in listed] == [(serial, "valid")]
        assert (
            api.get(f"/v1/certificates/{serial}").json()["certificate_pem"]
            == (issued["certificate_pem"])
        )
    assert fetch_public_pki(second, tmp_path, prefix="second-").issuing.read_bytes() == (
        pki.issuing.read_bytes()
    )
    good = ocsp(second, pki.issuing, pki.root, cert=dev)
    assert good.verified, good.stderr
    assert good.status_of(str(dev)) == "good"

    with second.client(ADMIN) as api:
        revoke(api, serial, "keyCompromise")
    second.kill9()

    third = _restart(gateway_factory, second)
    revoked = ocsp(third, pki.issuing, pki.root, cert=dev)
    assert revoked.verified, revoked.stderr
    assert revoked.status_of(str(dev)) == "revoked"
    assert "Reason: keyCompromise" in revoked.stdout

    after = fetch_public_pki(third, tmp_path, prefix="third-")
    crl = x509.load_pem_x509_crl(after.crl.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(int(serial, 16)) is not None
    rejected = verify(after.root, after.issuing, dev, crl=after.crl)
    assert "certificate revoked" in rejected.stderr, rejected.stderr
    with third.client(ADMIN) as api:
        shown = api.get(f"/v1/certificates/{serial}").json()
    assert (shown["status"], shown["revocation_reason"]) == ("revoked", "keyCompromise")
