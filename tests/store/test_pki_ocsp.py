"""OCSP (RevocationService.ocsp) on both backends, asked with cryptography's request builder and
parsed by fleetgate's own request parser, answers checked as a relying party checks them."""

from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509 import ocsp

from fleetgate.clock import FakeClock
from fleetgate.pki.crl import RevocationReason
from fleetgate.pki.records import CertificateAuthority
from fleetgate.services.bundle import Services
from fleetgate.services.context import SYSTEM_CALLER
from fleetgate.services.revocation import responder_credential_id
from fleetgate.store import Database

from .pki_fixtures import (
    DAY,
    add_device,
    answer,
    ask_ocsp,
    build_services,
    issue_csr,
    issue_held,
    issuing_ca,
    ocsp_request_by_hash,
    random_nonce,
    self_signed_pem,
    verify_ocsp_signature,
    x509_of,
)


@pytest.fixture
async def pki(db: Database, clock: FakeClock) -> Services:
    return await build_services(db, clock)


def assert_signed_by_responder(
    response: ocsp.OCSPResponse, ca: CertificateAuthority
) -> x509.Certificate:
    """The response is signed by a delegated responder the CA issued; returns that responder."""
    assert response.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL
    assert len(response.certificates) == 1
    responder = response.certificates[0]
    responder.verify_directly_issued_by(ca.certificate)
    responder.extensions.get_extension_for_class(x509.OCSPNoCheck)
    usages = responder.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.OCSP_SIGNING in usages
    verify_ocsp_signature(response, responder)
    assert response.responder_name is None
    assert response.responder_key_hash == (
        x509.SubjectKeyIdentifier.from_public_key(responder.public_key()).digest
    )
    return responder


@pytest.mark.parametrize("algorithm", [hashes.SHA1(), hashes.SHA256()], ids=["sha1", "sha256"])
async def test_a_valid_certificate_is_good(
    pki: Services, clock: FakeClock, algorithm: hashes.HashAlgorithm
) -> None:
    ca = await issuing_ca(pki)
    await add_device(pki, "cam-1")
    _, cert = await issue_held(pki, "cam-1", timedelta(days=30))
    clock.advance(120)
    response, fresh_until = await ask_ocsp(pki, x509_of(cert), ca.certificate, algorithm=algorithm)
    assert response.certificate_status is ocsp.OCSPCertStatus.GOOD
    assert response.serial_number == int(cert.serial, 16)
    assert isinstance(response.hash_algorithm, type(algorithm))
    assert response.this_update_utc == clock.now()
    validity = timedelta(seconds=pki.authority.config.ocsp_validity_s)
    assert response.next_update_utc == clock.now() + validity == fresh_until
    assert response.revocation_time_utc is None
    responder = assert_signed_by_responder(response, ca)
    held = await pki.credentials.get(SYSTEM_CALLER, responder_credential_id(ca.id))
    assert held.certificate is not None
    assert x509_of(held.certificate) == responder


async def test_the_nonce_is_echoed(pki: Services) -> None:
    ca = await issuing_ca(pki)
    await add_device(pki, "cam-2")
    _, cert = await issue_held(pki, "cam-2", timedelta(days=30))
    nonce = random_nonce()
    response, _ = await ask_ocsp(pki, x509_of(cert), ca.certificate, nonce=nonce)
    echoed = response.extensions.get_extension_for_class(x509.OCSPNonce).value
    assert echoed.nonce == nonce
    assert_signed_by_responder(response, ca)

    without, _ = await ask_ocsp(pki, x509_of(cert), ca.certificate)
    with pytest.raises(x509.ExtensionNotFound):
        without.extensions.get_extension_for_class(x509.OCSPNonce)


@pytest.mark.parametrize(
    ("reason", "flag"),
    [
        (RevocationReason.KEY_COMPROMISE, x509.ReasonFlags.key_compromise),
        (RevocationReason.SUPERSEDED, x509.ReasonFlags.superseded),
        (RevocationReason.UNSPECIFIED, None),
    ],
)
async def test_a_revoked_certificate_is_revoked_with_time_and_reason(
    pki: Services,
    clock: FakeClock,
    reason: RevocationReason,
    flag: x509.ReasonFlags | None,
) -> None:
    ca = await issuing_ca(pki)
    await add_device(pki, "cam-3")
    cert = await issue_csr(pki, "cam-3", timedelta(days=30))
    before, _ = await ask_ocsp(pki, x509_of(cert), ca.certificate)
    assert before.certificate_status is ocsp.OCSPCertStatus.GOOD

    clock.advance(3600)
    revoked_at = clock.now()
    await pki.revocation.revoke(SYSTEM_CALLER, cert.serial, reason)
    clock.advance(60)
    response, _ = await ask_ocsp(pki, x509_of(cert), ca.certificate)
    assert response.certificate_status is ocsp.OCSPCertStatus.REVOKED
    assert response.revocation_time_utc == revoked_at
    assert response.revocation_reason == flag
    assert response.serial_number == int(cert.serial, 16)
    assert_signed_by_responder(response, ca)


async def test_a_serial_never_issued_is_unknown(pki: Services) -> None:
    ca = await issuing_ca(pki)
    serial = x509.random_serial_number()
    response, _ = await answer(pki, ocsp_request_by_hash(ca.certificate, serial))
    assert response.certificate_status is ocsp.OCSPCertStatus.UNKNOWN
    assert response.serial_number == serial
    assert_signed_by_responder(response, ca)


async def test_a_request_about_another_issuer_is_unauthorized(
    pki: Services, clock: FakeClock
) -> None:
    now = clock.now()
    _, _, foreign_ca, foreign_key = self_signed_pem(
        "someone else's CA", now, now + timedelta(days=1), ca=True
    )
    _, _, foreign_leaf, _ = self_signed_pem("a leaf", now, now + timedelta(days=1))
    leaf = (
        x509.CertificateBuilder()
        .subject_name(foreign_leaf.subject)
        .issuer_name(foreign_ca.subject)
        .public_key(foreign_leaf.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(foreign_key, hashes.SHA256())
    )
    response, _ = await ask_ocsp(pki, leaf, foreign_ca, nonce=random_nonce())
    assert response.response_status is ocsp.OCSPResponseStatus.UNAUTHORIZED
    # Even about a serial fleetgate did issue, when asked under a CA it does not run.
    await add_device(pki, "cam-4")
    _, cert = await issue_held(pki, "cam-4", timedelta(days=30))
    mine = int(cert.serial, 16)
    response, _ = await answer(pki, ocsp_request_by_hash(foreign_ca, mine))
    assert response.response_status is ocsp.OCSPResponseStatus.UNAUTHORIZED
    # The root signs no end-entity certificates, so it answers for none.
    root = next(ca for ca in await pki.authority.authorities() if ca.role.value == "root")
    response, _ = await answer(pki, ocsp_request_by_hash(root.certificate, mine))
    assert response.response_status is ocsp.OCSPResponseStatus.UNAUTHORIZED


async def test_a_rotated_ca_still_answers_through_its_own_responder(
    pki: Services, clock: FakeClock
) -> None:
    old_ca = await issuing_ca(pki)
    await add_device(pki, "cam-5")
    _, old_cert = await issue_held(pki, "cam-5", timedelta(days=30))
    new_ca = await pki.authority.rotate_issuing(SYSTEM_CALLER)
    await add_device(pki, "cam-6")
    _, new_cert = await issue_held(pki, "cam-6", timedelta(days=30))
    assert (old_cert.issuer_id, new_cert.issuer_id) == (old_ca.id, new_ca.id)

    old_answer, _ = await ask_ocsp(pki, x509_of(old_cert), old_ca.certificate)
    assert old_answer.certificate_status is ocsp.OCSPCertStatus.GOOD
    old_responder = assert_signed_by_responder(old_answer, old_ca)
    new_answer, _ = await ask_ocsp(pki, x509_of(new_cert), new_ca.certificate)
    assert new_answer.certificate_status is ocsp.OCSPCertStatus.GOOD
    assert assert_signed_by_responder(new_answer, new_ca) != old_responder
    # A certificate asked about under the wrong (but known) issuer is unknown there.
    crossed, _ = await answer(
        pki, ocsp_request_by_hash(new_ca.certificate, int(old_cert.serial, 16))
    )
    assert crossed.certificate_status is ocsp.OCSPCertStatus.UNKNOWN


async def test_a_renewed_away_certificate_stays_good(pki: Services, clock: FakeClock) -> None:
    ca = await issuing_ca(pki)
    await add_device(pki, "cam-7")
    _, cert = await issue_held(pki, "cam-7", timedelta(days=3))
    clock.advance(2 * DAY + 3600)
    ((old, new),) = [r for r in await pki.lifecycle.renew_due() if r[0] == cert.serial]
    renewed = await pki.revocation.certificate(SYSTEM_CALLER, new)
    for record in (cert, renewed):
        response, _ = await ask_ocsp(pki, x509_of(record), ca.certificate)
        assert response.certificate_status is ocsp.OCSPCertStatus.GOOD
    assert old == cert.serial
