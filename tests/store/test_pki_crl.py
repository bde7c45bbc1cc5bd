"""CRLs (RevocationService.refresh_crls / crl / revoke) on both backends.

Every CRL is checked as a relying party would: parsed with cryptography, its signature verified
against the issuing CA, its number, dates and entries read from the DER.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from fleetgate.clock import FakeClock
from fleetgate.config.schema import PkiConfig
from fleetgate.errors import Conflict, NotFound
from fleetgate.pki.crl import RevocationReason
from fleetgate.pki.records import CertificateAuthority, CrlRecord, IssuedCertificate
from fleetgate.services.bundle import Services
from fleetgate.services.context import SYSTEM_CALLER
from fleetgate.store import Database

from .helpers import audit_entries, warm_up
from .pki_fixtures import (
    DAY,
    add_device,
    advance_to,
    build_services,
    issue_csr,
    issue_held,
    issuing_ca,
)


@pytest.fixture
async def pki(db: Database, clock: FakeClock) -> Services:
    return await build_services(db, clock)


def checked(record: CrlRecord, ca: CertificateAuthority) -> x509.CertificateRevocationList:
    """The CRL as a relying party sees it, after checking it matches its record and its CA."""
    crl = x509.load_der_x509_crl(record.der)
    public_key = ca.certificate.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert crl.is_signature_valid(public_key)
    assert crl.issuer == ca.certificate.subject
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == (
        record.number
    )
    assert crl.last_update_utc == record.this_update
    assert crl.next_update_utc == record.next_update
    assert record.issuer_id == ca.id
    return crl


def listed(crl: x509.CertificateRevocationList) -> set[int]:
    return {entry.serial_number for entry in crl}


def reason_of(entry: x509.RevokedCertificate) -> x509.ReasonFlags | None:
    try:
        return entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    except x509.ExtensionNotFound:
        return None


def issuing_only(ids: list[str]) -> list[str]:
    """The issuing CAs among refreshed CRLs (the root publishes one too)."""
    return [i for i in ids if i.startswith("issuing-")]


async def some_certificates(pki: Services, count: int, lifetime: timedelta) -> list[str]:
    serials = []
    for n in range(count):
        await add_device(pki, f"dev-{n}")
        serials.append((await issue_csr(pki, f"dev-{n}", lifetime)).serial)
    return serials


async def test_the_crl_is_refreshed_only_after_its_refresh_point(
    pki: Services, clock: FakeClock, db: Database
) -> None:
    ca = await issuing_ca(pki)
    lifetime = pki.authority.config.crl_lifetime_s
    fraction = pki.authority.config.crl_refresh_fraction
    assert issuing_only(await pki.revocation.refresh_crls()) == [ca.id]  # none yet: made now
    first = await pki.revocation.crl()
    assert first.number == 1
    assert first.this_update == clock.now()
    assert first.next_update == clock.now() + timedelta(seconds=lifetime)
    assert listed(checked(first, ca)) == set()
    assert issuing_only(await pki.revocation.refresh_crls()) == []

    advance_to(clock, first.this_update + timedelta(seconds=lifetime * fraction - 1))
    assert issuing_only(await pki.revocation.refresh_crls()) == []
    assert await pki.revocation.crl() == first

    clock.advance(1)
    assert issuing_only(await pki.revocation.refresh_crls()) == [ca.id]
    second = await pki.revocation.crl()
    assert second.number == first.number + 1
    assert second.this_update == clock.now() > first.this_update
    assert second.next_update == clock.now() + timedelta(seconds=lifetime)
    checked(second, ca)
    assert issuing_only(await pki.revocation.refresh_crls()) == []
    assert await pki.revocation.crl() == second
    # Each refresh is on the change feed, so mtls listeners load the new CRL before theirs ends.
    refreshes = await audit_entries(db, action="crl.refresh", target_id=ca.id)
    assert [(entry.after or {})["number"] for entry in refreshes] == [2, 1]  # newest first


@pytest.mark.parametrize(("lifetime_s", "fraction"), [(3600, 0.25), (2 * 86400, 0.9)])
async def test_custom_crl_lifetime_and_refresh_fraction(
    db: Database, clock: FakeClock, lifetime_s: int, fraction: float
) -> None:
    pki = await build_services(
        db, clock, PkiConfig(crl_lifetime_s=lifetime_s, crl_refresh_fraction=fraction)
    )
    ca = await issuing_ca(pki)
    first = await pki.revocation.crl()
    assert first.next_update - first.this_update == timedelta(seconds=lifetime_s)
    clock.advance(lifetime_s * fraction - 1)
    assert issuing_only(await pki.revocation.refresh_crls()) == []
    clock.advance(1)
    assert issuing_only(await pki.revocation.refresh_crls()) == [ca.id]
    second = await pki.revocation.crl()
    assert second.number == 2
    assert checked(second, ca).next_update_utc == clock.now() + timedelta(seconds=lifetime_s)


async def test_the_crl_never_outlives_its_ca(db: Database, clock: FakeClock) -> None:
    pki = await build_services(
        db, clock, PkiConfig(issuing_lifetime_days=30, crl_lifetime_s=7 * 86400)
    )
    ca = await issuing_ca(pki)
    assert ca.not_after == clock.now() + timedelta(days=30)
    first = await pki.revocation.crl()
    assert first.next_update == clock.now() + timedelta(days=7)

    advance_to(clock, ca.not_after - timedelta(days=2))
    assert issuing_only(await pki.revocation.refresh_crls()) == [ca.id]
    capped = await pki.revocation.crl()
    assert capped.next_update == ca.not_after
    assert checked(capped, ca).next_update_utc == ca.certificate.not_valid_after_utc

    # A revocation then is capped the same way.
    await add_device(pki, "late")
    late = await issue_csr(pki, "late", timedelta(days=1))
    await pki.revocation.revoke(SYSTEM_CALLER, late.serial, RevocationReason.KEY_COMPROMISE)
    after = await pki.revocation.crl()
    assert after.number == capped.number + 1
    assert after.next_update == ca.not_after
    assert int(late.serial, 16) in listed(checked(after, ca))


async def test_every_revocation_regenerates_the_crl_at_once(
    pki: Services, db: Database, clock: FakeClock
) -> None:
    ca = await issuing_ca(pki)
    a, b, c = await some_certificates(pki, 3, timedelta(days=30))
    await add_device(pki, "held")
    _, held = await issue_held(pki, "held", timedelta(days=30))
    start = (await pki.revocation.crl()).number

    clock.advance(3600)
    first_at = clock.now()
    revoked = await pki.revocation.revoke(SYSTEM_CALLER, a, RevocationReason.KEY_COMPROMISE)
    assert revoked.revoked_at == first_at
    assert revoked.revocation_reason is RevocationReason.KEY_COMPROMISE
    crl = await pki.revocation.crl()
    assert crl.number == start + 1
    assert crl.this_update == first_at
    parsed = checked(crl, ca)
    assert listed(parsed) == {int(a, 16)}
    entry = parsed.get_revoked_certificate_by_serial_number(int(a, 16))
    assert entry is not None
    assert entry.revocation_date_utc == first_at
    assert reason_of(entry) is x509.ReasonFlags.key_compromise

    clock.advance(10)
    # Serials are accepted in any case and with leading zeros.
    await pki.revocation.revoke(
        SYSTEM_CALLER, "00" + b.upper(), RevocationReason.CESSATION_OF_OPERATION
    )
    clock.advance(10)
    await pki.revocation.revoke(SYSTEM_CALLER, held.serial, RevocationReason.SUPERSEDED)
    crl = await pki.revocation.crl()
    assert crl.number == start + 3
    parsed = checked(crl, ca)
    assert listed(parsed) == {int(a, 16), int(b, 16), int(held.serial, 16)}
    reasons = {e.serial_number: (reason_of(e), e.revocation_date_utc) for e in parsed}
    assert reasons == {
        int(a, 16): (x509.ReasonFlags.key_compromise, first_at),
        int(b, 16): (x509.ReasonFlags.cessation_of_operation, first_at + timedelta(seconds=10)),
        int(held.serial, 16): (x509.ReasonFlags.superseded, first_at + timedelta(seconds=20)),
    }
    assert int(c, 16) not in listed(parsed)

    logged = await audit_entries(db, action="certificate.revoke")
    assert {e.target_id for e in logged} == {a, b, held.serial}
    assert {e.target_id: (e.after or {}).get("reason") for e in logged}[b] == (
        "cessationOfOperation"
    )


async def test_an_unspecified_reason_carries_no_reason_extension(pki: Services) -> None:
    ca = await issuing_ca(pki)
    (serial,) = await some_certificates(pki, 1, timedelta(days=30))
    revoked = await pki.revocation.revoke(SYSTEM_CALLER, serial, RevocationReason.UNSPECIFIED)
    assert revoked.revocation_reason is RevocationReason.UNSPECIFIED
    entry = checked(await pki.revocation.crl(), ca).get_revoked_certificate_by_serial_number(
        int(serial, 16)
    )
    assert entry is not None
    assert reason_of(entry) is None
    assert len(entry.extensions) == 0


async def test_revoking_twice_conflicts_and_unknown_serials_are_not_found(
    pki: Services, clock: FakeClock
) -> None:
    (serial,) = await some_certificates(pki, 1, timedelta(days=30))
    first = await pki.revocation.revoke(SYSTEM_CALLER, serial, RevocationReason.KEY_COMPROMISE)
    number = (await pki.revocation.crl()).number
    clock.advance(60)
    with pytest.raises(Conflict):
        await pki.revocation.revoke(SYSTEM_CALLER, serial, RevocationReason.SUPERSEDED)
    again = await pki.revocation.certificate(SYSTEM_CALLER, serial)
    assert again.revoked_at == first.revoked_at
    assert again.revocation_reason is RevocationReason.KEY_COMPROMISE
    assert (await pki.revocation.crl()).number == number
    with pytest.raises(NotFound):
        await pki.revocation.revoke(SYSTEM_CALLER, "1234abcd", RevocationReason.UNSPECIFIED)


async def test_revoked_certificates_drop_off_once_expired(pki: Services, clock: FakeClock) -> None:
    ca = await issuing_ca(pki)
    await add_device(pki, "short")
    await add_device(pki, "long")
    short = await issue_csr(pki, "short", timedelta(days=2))
    long = await issue_csr(pki, "long", timedelta(days=30))
    for cert in (short, long):
        await pki.revocation.revoke(SYSTEM_CALLER, cert.serial, RevocationReason.KEY_COMPROMISE)
    assert listed(checked(await pki.revocation.crl(), ca)) == {
        int(short.serial, 16),
        int(long.serial, 16),
    }

    advance_to(clock, short.not_after + timedelta(hours=1))
    (other,) = await some_certificates(pki, 1, timedelta(days=90))
    await pki.revocation.revoke(SYSTEM_CALLER, other, RevocationReason.AFFILIATION_CHANGED)
    assert listed(checked(await pki.revocation.crl(), ca)) == {int(long.serial, 16), int(other, 16)}

    # And a scheduled refresh after the long one's end lists only what is still valid.
    advance_to(clock, long.not_after + timedelta(seconds=1))
    issuing_only(await pki.revocation.refresh_crls())
    clock.advance(7 * DAY)
    issuing_only(await pki.revocation.refresh_crls())
    assert listed(checked(await pki.revocation.crl(), ca)) == {int(other, 16)}


async def test_certificates_of_a_rotated_ca_are_listed_on_that_cas_crl(
    pki: Services, clock: FakeClock
) -> None:
    old_ca = await issuing_ca(pki)
    (old_serial,) = await some_certificates(pki, 1, timedelta(days=30))
    new_ca = await pki.authority.rotate_issuing(SYSTEM_CALLER)
    await add_device(pki, "after-rotation")
    new_cert = await issue_csr(pki, "after-rotation", timedelta(days=30))
    assert new_cert.issuer_id == new_ca.id

    await pki.revocation.revoke(SYSTEM_CALLER, old_serial, RevocationReason.KEY_COMPROMISE)
    await pki.revocation.revoke(SYSTEM_CALLER, new_cert.serial, RevocationReason.SUPERSEDED)
    assert listed(checked(await pki.revocation.crl(old_ca.id), old_ca)) == {int(old_serial, 16)}
    assert listed(checked(await pki.revocation.crl(), new_ca)) == {int(new_cert.serial, 16)}
    assert (await pki.revocation.crl(new_ca.id)).issuer_id == new_ca.id
    # Both keep being refreshed on schedule.
    clock.advance(pki.authority.config.crl_lifetime_s)
    assert sorted(issuing_only(await pki.revocation.refresh_crls())) == sorted(
        [old_ca.id, new_ca.id]
    )
    assert listed(checked(await pki.revocation.crl(old_ca.id), old_ca)) == {int(old_serial, 16)}


async def test_concurrent_revocations_all_land_on_strictly_numbered_crls(
    pki: Services, db: Database
) -> None:
    """Ten operators revoke at once: each revocation succeeds, each makes a new CRL number, and
    the final CRL lists all ten."""
    ca = await issuing_ca(pki)
    serials = await some_certificates(pki, 10, timedelta(days=30))
    start = (await pki.revocation.crl()).number
    await warm_up(db)
    seen: list[int] = []

    async def revoke(serial: str) -> IssuedCertificate:
        revoked = await pki.revocation.revoke(SYSTEM_CALLER, serial, RevocationReason.SUPERSEDED)
        seen.append((await pki.revocation.crl()).number)
        return revoked

    results = await asyncio.gather(*(revoke(s) for s in serials), return_exceptions=True)
    failures = [repr(r) for r in results if isinstance(r, BaseException)]
    assert failures == [], f"{len(failures)} of 10 concurrent revocations failed: {failures[0]}"
    final = await pki.revocation.crl()
    assert final.number == start + 10
    assert all(start < n <= final.number for n in seen)
    assert listed(checked(final, ca)) == {int(s, 16) for s in serials}
    for serial in serials:
        assert (await pki.revocation.certificate(SYSTEM_CALLER, serial)).revoked
