"""A key fleetgate generated leaves it once, as PKCS#12 that `openssl pkcs12` opens; it never
shows up in the credential API, the audit log or the gateway's own log."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from e2e.conftest import ADMIN
from e2e.gateway import Gateway
from e2e.pki_support import add_device, issue_generated, openssl, problem, write_pem

PASSWORD = "correct horse battery"


def _secret_spellings(key_pem: Path) -> list[str]:
    """Ways the private key could leak: PKCS#8 and traditional PEM bodies, raw DER base64."""
    key = serialization.load_pem_private_key(key_pem.read_bytes(), password=None)
    spellings: list[str] = []
    for fmt in (serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL):
        der = key.private_bytes(serialization.Encoding.DER, fmt, serialization.NoEncryption())
        spellings.append(base64.b64encode(der).decode())  # on one line, as JSON would carry it
        spellings.append(base64.encodebytes(der).decode().splitlines()[0])  # a PEM line
    return spellings


def test_a_generated_key_is_exported_once_and_never_shown(gateway: Gateway, tmp_path: Path) -> None:
    with gateway.client(ADMIN) as api:
        add_device(api, "meter-7")
        issued = issue_generated(api, "meter-7", "ec-p256")
        credential_id = issued["credential_id"]
        assert credential_id == "device-meter-7"

        exported = api.post(
            f"/v1/credentials/{credential_id}/export",
            json={"format": "pkcs12", "password": PASSWORD},
        )
        assert exported.status_code == 200, exported.text
        assert exported.headers["content-type"] == "application/pkcs12"
        assert exported.headers["cache-control"] == "no-store"

        again = api.post(f"/v1/credentials/{credential_id}/export", json={"format": "pem"})
        assert "once" in problem(again, 409)["detail"]
        shown = api.get(f"/v1/credentials/{credential_id}")
        audit = api.get("/v1/audit", params={"limit": 500})
    assert shown.status_code == 200
    assert shown.json()["exported_at"] is not None
    assert shown.json()["has_secret"] is True

    bundle = tmp_path / "meter-7.p12"
    bundle.write_bytes(exported.content)
    wrong = openssl(
        "pkcs12", "-in", bundle, "-passin", "pass:wrong-password", "-nodes", check=False
    )
    assert wrong.returncode != 0
    opened = openssl("pkcs12", "-in", bundle, "-passin", f"pass:{PASSWORD}", "-nodes").stdout
    begin, end = "-----BEGIN PRIVATE KEY-----", "-----END PRIVATE KEY-----"
    key_text = opened[opened.index(begin) : opened.index(end) + len(end)] + "\n"
    key_pem = write_pem(tmp_path / "key.pem", key_text)
    leaf = write_pem(tmp_path / "leaf.pem", issued["certificate_pem"])
    assert issued["certificate_pem"].strip() in opened  # the certificate travels with it
    assert issued["chain_pem"].strip() in opened  # and so does the issuing CA
    key_public = openssl("pkey", "-in", key_pem, "-pubout").stdout
    cert_public = openssl("x509", "-in", leaf, "-noout", "-pubkey").stdout
    assert key_public == cert_public

    # The key never appears in an answer, the audit log, or the gateway's log.
    leaks = _secret_spellings(key_pem)
    places = {
        "GET /v1/credentials/{id}": shown.text,
        "GET /v1/audit": audit.text,
        "gateway log": json.dumps(gateway.events) + "\n".join(gateway.stdout_lines),
    }
    for where, text in places.items():
        assert "PRIVATE KEY" not in text, where
        for spelling in leaks:
            assert spelling not in text, f"the private key leaks into {where}"
    actions = [e["action"] for e in audit.json()["items"]]
    assert "credential.export" in actions


def test_the_ocsp_responder_key_cannot_be_exported(gateway: Gateway) -> None:
    """The OCSP responder's key signs revocation answers for the whole issuing CA, and its
    certificate carries id-pkix-ocsp-nocheck, so a stolen copy cannot be revoked: it must
    never leave fleetgate, least of all to an operator token that manages devices."""
    with gateway.client(ADMIN) as api:
        operator = api.post("/v1/tokens", json={"name": "ops", "role": "operator"})
        assert operator.status_code == 201, operator.text
        responders = [
            c["id"]
            for c in api.get("/v1/credentials").json()["items"]
            if c["id"].startswith("fleetgate-ocsp-")
        ]
    assert len(responders) == 1, responders
    with gateway.client(operator.json()["secret"]) as api:
        exported = api.post(f"/v1/credentials/{responders[0]}/export", json={"format": "pem"})
    assert "PRIVATE KEY" not in exported.text, (
        f"an operator token exported the OCSP responder's key ({exported.status_code})"
    )
    assert exported.status_code in (403, 409, 422), exported.text
