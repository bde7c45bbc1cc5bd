"""Automatic renewal (LifecycleService.renew_due / maintain) on both backends.

fleetgate renews what it holds the key of (device certificates it generated the key for, its
own OCSP responders) once ``renew_at_fraction`` of their lifetime has passed: same key, same
names, a new serial; the old certificate stays valid until its own end.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from fleetgate.clock import FakeClock
from fleetgate.config.schema import AlertConfig, PkiConfig
from fleetgate.pki.profiles import Profile
from fleetgate.pki.records import CertificateAuthority, IssuedCertificate
from fleetgate.services.bundle import Services
from fleetgate.services.context import SYSTEM_CALLER
from fleetgate.services.revocation import responder_credential_id
from fleetgate.store import Database
from fleetgate.store.certificates import CertificateQuery, CertificateRepo

from .helpers import audit_entries, warm_up
from .pki_fixtures import (
    DAY,
    add_device,
    advance_to,
    another_node,
    ask_ocsp,
    build_services,
    certificates_of,
    issue_csr,
    issue_held,
    issuing_ca,
    key_public_der,
    public_der,
    verify_ocsp_signature,
    x509_of,
)

PKI = PkiConfig(
    device_dns_templates=("#{device_id}.devices.example.net",),
    device_uri_templates=("urn:fleet:#{group}:#{device_id}",),
)
NO_ALERTS = AlertConfig(webhook_url=None)


@pytest.fixture
async def pki(db: Database, clock: FakeClock) -> Services:
    return await build_services(db, clock, PKI)


def renew_at(cert: IssuedCertificate, fraction: float) -> timedelta:
    """How long after ``not_before`` fleetgate renews ``cert``."""
    return (cert.not_after - cert.not_before) * fraction


def sans(certificate: x509.Certificate) -> x509.SubjectAlternativeName:
    return certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


async def test_held_key_certificate_renews_after_two_thirds_of_its_lifetime(
    pki: Services, db: Database, clock: FakeClock
) -> None:
    await add_device(pki, "meter-1")
    credential, old = await issue_held(pki, "meter-1", timedelta(days=30))
    lifetime = old.not_after - old.not_before
    point = old.not_before + lifetime * pki.authority.config.renew_at_fraction
    two_thirds = old.not_before + lifetime * 2 / 3
    assert abs(point - two_thirds) < timedelta(minutes=5)

    advance_to(clock, two_thirds - timedelta(minutes=10))
    assert await pki.lifecycle.renew_due() == []
    assert (await pki.lifecycle.maintain(NO_ALERTS)).renewed == []
    assert (await pki.credentials.get(SYSTEM_CALLER, credential.id)).certificate_serial == (
        old.serial
    )

    clock.advance(20 * 60)
    renewed = await pki.lifecycle.renew_due()
    assert len(renewed) == 1
    old_serial, new_serial = renewed[0]
    assert old_serial == old.serial
    assert new_serial != old.serial

    new = await pki.revocation.certificate(SYSTEM_CALLER, new_serial)
    before, after = x509_of(old), x509_of(new)
    assert after.serial_number == int(new_serial, 16)
    assert public_der(after) == public_der(before)
    assert after.subject == before.subject
    assert after.subject.rfc4514_string() == "CN=meter-1"
    assert sans(after) == sans(before)
    assert sans(after).get_values_for_type(x509.DNSName) == ["meter-1.devices.example.net"]
    assert sans(after).get_values_for_type(x509.UniformResourceIdentifier) == [
        "urn:fleet:default:meter-1"
    ]
    assert new.sans == old.sans
    assert new.profile is Profile.DEVICE_CLIENT
    assert new.device_id == "meter-1"
    assert new.credential_id == credential.id
    # A fresh validity period of the same length, starting now.
    assert new.not_before <= clock.now() <= new.not_before + timedelta(minutes=2)
    assert new.not_after - new.not_before == lifetime
    after.verify_directly_issued_by((await issuing_ca(pki)).certificate)

    current = await pki.credentials.get(SYSTEM_CALLER, credential.id)
    assert current.certificate_serial == new_serial
    assert current.certificate == new.der
    assert current.not_after == new.not_after
    assert current.revision > credential.revision
    secret = await pki.credentials.secret(current)
    assert secret is not None
    assert key_public_der(secret.reveal()) == public_der(after)

    previous = await pki.revocation.certificate(SYSTEM_CALLER, old.serial)
    assert previous.revoked is False
    assert previous.renewed_by == new_serial
    crl = x509.load_der_x509_crl((await pki.revocation.crl()).der)
    assert crl.get_revoked_certificate_by_serial_number(int(old.serial, 16)) is None

    entries = await audit_entries(db, action="certificate.renew")
    assert [(e.target_id, e.actor) for e in entries] == [(old.serial, "token:system")]
    assert entries[0].after is not None
    assert entries[0].after["serial"] == new_serial
    assert entries[0].after["credential_id"] == credential.id
    assert entries[0].after["device_id"] == "meter-1"

    # Nothing more to do, now or a day later.
    assert await pki.lifecycle.renew_due() == []
    clock.advance(DAY)
    assert await pki.lifecycle.renew_due() == []
    assert len(await certificates_of(db, "meter-1")) == 2
    assert len(await audit_entries(db, action="certificate.renew")) == 1


async def test_the_renewed_certificate_renews_again_at_its_own_point(
    pki: Services, clock: FakeClock
) -> None:
    await add_device(pki, "meter-2")
    _, first = await issue_held(pki, "meter-2", timedelta(days=9))
    advance_to(clock, first.not_before + renew_at(first, 0.6667) + timedelta(minutes=1))
    ((_, second_serial),) = await pki.lifecycle.renew_due()
    second = await pki.revocation.certificate(SYSTEM_CALLER, second_serial)
    advance_to(clock, second.not_before + renew_at(second, 0.6667) - timedelta(minutes=5))
    assert await pki.lifecycle.renew_due() == []
    clock.advance(10 * 60)
    ((renewed, third_serial),) = await pki.lifecycle.renew_due()
    assert renewed == second_serial
    assert third_serial not in (first.serial, second_serial)
    assert public_der(x509_of(await pki.revocation.certificate(SYSTEM_CALLER, third_serial))) == (
        public_der(x509_of(first))
    )


async def test_a_csr_issued_certificate_is_never_renewed(
    pki: Services, db: Database, clock: FakeClock
) -> None:
    await add_device(pki, "sensor-csr")
    await add_device(pki, "sensor-held")
    from_csr = await issue_csr(pki, "sensor-csr", timedelta(days=30))
    assert from_csr.credential_id is None
    _, held = await issue_held(pki, "sensor-held", timedelta(days=30))

    for _ in range(29):
        clock.advance(DAY)
        renewed = await pki.lifecycle.renew_due()
        assert all(old != from_csr.serial for old, _ in renewed)
    assert [c.serial for c in await certificates_of(db, "sensor-csr")] == [from_csr.serial]
    assert (await pki.revocation.certificate(SYSTEM_CALLER, from_csr.serial)).renewed_by is None
    # The held one next to it was renewed meanwhile (the control).
    assert (await pki.revocation.certificate(SYSTEM_CALLER, held.serial)).renewed_by is not None


@pytest.mark.parametrize("fraction", [0.25, 0.9])
async def test_renewal_follows_a_custom_renew_at_fraction(
    db: Database, clock: FakeClock, fraction: float
) -> None:
    pki = await build_services(db, clock, PkiConfig(renew_at_fraction=fraction))
    await add_device(pki, "meter-f")
    _, old = await issue_held(pki, "meter-f", timedelta(days=40))
    point = old.not_before + renew_at(old, fraction)
    assert point == old.not_before + (old.not_after - old.not_before) * fraction

    advance_to(clock, point - timedelta(hours=1))
    assert await pki.lifecycle.renew_due() == []
    clock.advance(2 * 3600)
    ((renewed, _),) = await pki.lifecycle.renew_due()
    assert renewed == old.serial


async def responder_certificate(pki: Services, ca: CertificateAuthority) -> IssuedCertificate:
    credential = await pki.credentials.get(SYSTEM_CALLER, responder_credential_id(ca.id))
    assert credential.certificate_serial is not None
    assert credential.device_id is None
    return await pki.revocation.certificate(SYSTEM_CALLER, credential.certificate_serial)


def assert_responder_profile(certificate: x509.Certificate, ca: CertificateAuthority) -> None:
    certificate.verify_directly_issued_by(ca.certificate)
    assert certificate.issuer == ca.certificate.subject
    certificate.extensions.get_extension_for_class(x509.OCSPNoCheck)
    usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usages) == [ExtendedKeyUsageOID.OCSP_SIGNING]


async def test_the_ocsp_responder_is_renewed_when_due_by_its_own_ca(
    pki: Services, clock: FakeClock
) -> None:
    old_ca = await issuing_ca(pki)
    await pki.lifecycle.maintain(NO_ALERTS)  # makes the responder
    old_responder = await responder_certificate(pki, old_ca)
    assert old_responder.profile is Profile.OCSP_RESPONDER
    assert_responder_profile(x509_of(old_responder), old_ca)

    # A newer issuing CA takes over issuing; the old one keeps answering for its certificates.
    new_ca = await pki.authority.rotate_issuing(SYSTEM_CALLER)
    await pki.lifecycle.maintain(NO_ALERTS)
    new_responder = await responder_certificate(pki, new_ca)
    assert_responder_profile(x509_of(new_responder), new_ca)

    point = old_responder.not_before + renew_at(old_responder, 0.6667)
    advance_to(clock, point - timedelta(hours=1))
    assert await pki.lifecycle.renew_due() == []
    clock.advance(2 * 3600)
    renewed = dict(await pki.lifecycle.renew_due())
    assert set(renewed) == {old_responder.serial, new_responder.serial}

    for ca, before in ((old_ca, old_responder), (new_ca, new_responder)):
        after = await responder_certificate(pki, ca)
        assert after.serial == renewed[before.serial]
        assert after.issuer_id == ca.id
        assert_responder_profile(x509_of(after), ca)
        previous = await pki.revocation.certificate(SYSTEM_CALLER, before.serial)
        assert previous.renewed_by == after.serial
        assert previous.revoked is False
        # The responder now signs with the renewed certificate (and its sealed key matches).
        response, _ = await ask_ocsp(pki, x509_of(after), ca.certificate)
        assert response.certificates == [x509_of(after)]
        verify_ocsp_signature(response, x509_of(after))
    assert await pki.lifecycle.renew_due() == []


async def test_two_nodes_renewing_at_once_renew_each_certificate_once(
    pki: Services, db: Database, clock: FakeClock
) -> None:
    other = another_node(pki, clock)
    for n in range(3):
        await add_device(pki, f"meter-{n}")
        await issue_held(pki, f"meter-{n}", timedelta(days=30))
    await warm_up(db)
    clock.advance(21 * DAY)
    first, second = await asyncio.gather(pki.lifecycle.renew_due(), other.lifecycle.renew_due())
    renewed = dict(first + second)
    assert len(first) + len(second) == 3 == len(renewed)
    for n in range(3):
        credential = await pki.credentials.get(SYSTEM_CALLER, f"device-meter-{n}")
        certificates = await certificates_of(db, f"meter-{n}")
        assert len(certificates) == 2
        (old,) = [c for c in certificates if c.renewed_by is not None]
        assert old.renewed_by == credential.certificate_serial == renewed[old.serial]
    assert len(await audit_entries(db, action="certificate.renew")) == 3


@pytest.mark.parametrize("schedule", ["reads_interleaved", "first_commits_between"])
async def test_two_nodes_renewing_the_ocsp_responder_at_once_leave_one_consistent_responder(
    pki: Services,
    db: Database,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
    schedule: str,
) -> None:
    """Two nodes renew the same responder. On PostgreSQL the schedule is forced: both read the
    responder credential before either commits, then either they go on side by side
    (``reads_interleaved``) or the first commits before the second goes on
    (``first_commits_between``). SQLite's single writer cannot interleave them at all.

    Whatever the schedule: the sealed key belongs to the certificate the credential names, and
    exactly one responder certificate is left live (the other renewal rolled back), so nothing
    is left that can never be renewed.
    """
    ca = await issuing_ca(pki)
    other = another_node(pki, clock)
    await pki.lifecycle.maintain(NO_ALERTS)
    old = await responder_certificate(pki, ca)
    await warm_up(db)
    clock.advance(21 * DAY)
    first = asyncio.create_task(pki.lifecycle.renew_due())
    second = asyncio.create_task(other.lifecycle.renew_due())
    if db.dialect == "postgresql":
        barrier = asyncio.Barrier(2)
        original = CertificateRepo.insert

        async def insert_in_step(
            self: CertificateRepo, cert: IssuedCertificate, **kwargs: object
        ) -> None:
            if cert.profile is Profile.OCSP_RESPONDER:
                await asyncio.wait_for(barrier.wait(), timeout=10)
                if schedule == "first_commits_between" and asyncio.current_task() is second:
                    await asyncio.wait_for(asyncio.shield(first), timeout=10)
            await original(self, cert, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(CertificateRepo, "insert", insert_in_step)
    await asyncio.gather(first, second)
    monkeypatch.undo()

    credential = await pki.credentials.get(SYSTEM_CALLER, responder_credential_id(ca.id))
    assert credential.certificate is not None
    assert credential.certificate_serial != old.serial
    secret = await pki.credentials.secret(credential)
    assert secret is not None
    assert key_public_der(secret.reveal()) == public_der(x509_of(credential.certificate)), (
        "the responder credential names one certificate but its sealed key belongs to another"
    )
    # A third node (nothing cached) answers OCSP with a signature its certificate verifies.
    third = another_node(pki, clock)
    await add_device(pki, "probe")
    _, probe = await issue_held(pki, "probe", timedelta(days=30))
    response, _ = await ask_ocsp(third, x509_of(probe), ca.certificate)
    verify_ocsp_signature(response, response.certificates[0])
    async with db.snapshot() as tx:
        responders = await CertificateRepo(tx).list(
            CertificateQuery(profile=Profile.OCSP_RESPONDER, renewed=False), limit=100
        )
    assert [c.serial for c in responders] == [credential.certificate_serial], (
        "a second live responder certificate is left that no renewal will ever replace"
    )
    # A month of maintenance later: everything renewed on time, so nothing is alerted.
    for _ in range(30):
        clock.advance(DAY)
        assert (await pki.lifecycle.maintain(NO_ALERTS)).alerts_sent == []
