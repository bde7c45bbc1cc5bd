"""`fleetgate cert issue|list|revoke` and `fleetgate ca list` against a running gateway."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from e2e.conftest import ADMIN
from e2e.gateway import Gateway, run_cli
from e2e.pki_support import add_device, fetch_public_pki, make_csr, ocsp, verify


def _json(gateway: Gateway, *args: str) -> Any:
    result = run_cli(gateway, *args, "--json", token=ADMIN)
    assert result.returncode == 0, (args, result.returncode, result.stderr)
    return json.loads(result.stdout)


def test_cert_issue_list_revoke_and_ca_list(gateway: Gateway, tmp_path: Path) -> None:
    with gateway.client(ADMIN) as api:
        add_device(api, "meter-7")
    _, csr = make_csr(tmp_path, "meter-7", "/CN=meter-7")
    out = tmp_path / "meter-7.pem"

    issued = _json(gateway, "cert", "issue", "meter-7", "--csr", str(csr), "--out", str(out))
    serial: str = issued["certificate"]["serial"]
    assert issued["certificate"]["subject"] == "meter-7"
    assert issued["credential_id"] is None  # the key stayed with the device
    pki = fetch_public_pki(gateway, tmp_path)
    # --out holds the certificate followed by the issuing CA.
    assert out.read_text() == issued["certificate_pem"] + issued["chain_pem"]
    assert verify(pki.root, out, out).returncode == 0

    generated = _json(gateway, "cert", "issue", "meter-7", "--generate-key", "ed25519")
    assert generated["credential_id"] == "device-meter-7"
    assert generated["certificate"]["key_algorithm"] == "ed25519"

    listed = _json(gateway, "cert", "list", "--device", "meter-7")
    assert sorted(c["serial"] for c in listed["items"]) == sorted(
        [serial, generated["certificate"]["serial"]]
    )
    assert {c["status"] for c in listed["items"]} == {"valid"}

    revoked = _json(gateway, "cert", "revoke", serial, "--reason", "keyCompromise")
    assert (revoked["status"], revoked["revocation_reason"]) == ("revoked", "keyCompromise")
    answer = ocsp(gateway, pki.issuing, pki.root, cert=out)
    assert answer.status_of(str(out)) == "revoked"
    only_revoked = _json(gateway, "cert", "list", "--status", "revoked")
    assert [c["serial"] for c in only_revoked["items"]] == [serial]

    # The table a person reads, and the exit codes from the error table.
    table = run_cli(gateway, "cert", "list", "--device", "meter-7", token=ADMIN)
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].split()[:3] == ["SERIAL", "SUBJECT", "DEVICE"]
    assert any(line.startswith(serial) and "revoked" in line for line in table.stdout.splitlines())
    again = run_cli(gateway, "cert", "revoke", serial, token=ADMIN)
    assert again.returncode == 73, (again.stdout, again.stderr)  # conflict: revoked already
    missing = run_cli(gateway, "cert", "issue", "nobody", "--generate-key", "ec-p256", token=ADMIN)
    assert missing.returncode == 66, missing.stderr
    both = run_cli(
        gateway, "cert", "issue", "meter-7", "--csr", str(csr), "--generate-key", "ec-p256",
        token=ADMIN,
    )  # fmt: skip
    assert both.returncode == 2
    anonymous = run_cli(gateway, "cert", "list", token=None)
    assert anonymous.returncode == 77  # not authenticated

    cas = _json(gateway, "ca", "list")["items"]
    roles = sorted((c["role"], c["active"], c["key_held"]) for c in cas)
    assert roles == [("issuing", True, True), ("root", True, True)]
    issuing = next(c for c in cas if c["role"] == "issuing")
    assert issuing["id"] == revoked["issuer_id"]
    assert issuing["certificate_pem"] == pki.issuing.read_text()
    ca_table = run_cli(gateway, "ca", "list", token=ADMIN)
    assert ca_table.returncode == 0, ca_table.stderr
    assert "issuing (active)" in ca_table.stdout
