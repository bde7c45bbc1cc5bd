"""The expiry inventory (LifecycleService.inventory) on both backends."""

from __future__ import annotations

from datetime import timedelta

import pytest

from fleetgate.clock import FakeClock
from fleetgate.pki.crl import RevocationReason
from fleetgate.services.bundle import Services
from fleetgate.services.context import SYSTEM_CALLER
from fleetgate.services.lifecycle import InventoryItem, ItemKind
from fleetgate.store import Database

from .pki_fixtures import (
    DAY,
    add_device,
    build_services,
    import_x509,
    issue_csr,
    issue_held,
    issuing_ca,
    root_ca,
)


@pytest.fixture
async def pki(db: Database, clock: FakeClock) -> Services:
    return await build_services(db, clock)


def keys(items: list[InventoryItem]) -> list[str]:
    return [i.key for i in items]


async def test_the_inventory_lists_what_can_still_expire_soonest_first(
    pki: Services, clock: FakeClock
) -> None:
    root, issuing = await root_ca(pki), await issuing_ca(pki)
    for device in ("renewed", "expired", "held", "csr", "revoked"):
        await add_device(pki, device)
    _, renewed_away = await issue_held(pki, "renewed", timedelta(days=3))
    expired = await issue_csr(pki, "expired", timedelta(days=1))
    clock.advance(2 * DAY + 3600)
    ((old, successor_serial),) = await pki.lifecycle.renew_due()
    assert old == renewed_away.serial
    successor = await pki.revocation.certificate(SYSTEM_CALLER, successor_serial)

    held_credential, held = await issue_held(pki, "held", timedelta(days=30))
    csr = await issue_csr(pki, "csr", timedelta(days=10))
    revoked = await issue_csr(pki, "revoked", timedelta(days=10))
    await pki.revocation.revoke(SYSTEM_CALLER, revoked.serial, RevocationReason.KEY_COMPROMISE)
    imported = await import_x509(pki, clock, "ext-1", timedelta(days=20))
    crl = await pki.revocation.crl()

    items = await pki.lifecycle.inventory()
    assert sorted(keys(items)) == sorted(
        [
            f"certificate:{successor.serial}",
            f"certificate:{held.serial}",
            f"certificate:{csr.serial}",
            "imported:ext-1",
            f"ca:{root.id}",
            f"ca:{issuing.id}",
            f"crl:{issuing.id}",
        ]
    )
    for gone in (renewed_away, expired, revoked):
        assert f"certificate:{gone.serial}" not in keys(items)
    # Sorted by end date (the successor ends in 3 days, the CRL in 7, and so on).
    assert [i.not_after for i in items] == sorted(i.not_after for i in items)
    assert keys(items) == [
        f"certificate:{successor.serial}",
        f"crl:{issuing.id}",
        f"certificate:{csr.serial}",
        "imported:ext-1",
        f"certificate:{held.serial}",
        f"ca:{issuing.id}",
        f"ca:{root.id}",
    ]

    by_key = {i.key: i for i in items}
    held_item = by_key[f"certificate:{held.serial}"]
    assert held_item.kind is ItemKind.CERTIFICATE
    assert (held_item.not_after, held_item.device_id) == (held.not_after, "held")
    assert held_item.credential_id == held_credential.id
    assert held_item.renews_automatically is True
    assert held_item.renew_by is not None
    assert held.not_before < held_item.renew_by < held.not_after
    csr_item = by_key[f"certificate:{csr.serial}"]
    assert (csr_item.renews_automatically, csr_item.renew_by, csr_item.credential_id) == (
        False,
        None,
        None,
    )
    imported_item = by_key["imported:ext-1"]
    assert imported_item.kind is ItemKind.IMPORTED
    assert imported_item.not_after == imported.not_after
    assert imported_item.subject == "CN=imported ext-1"
    assert imported_item.renews_automatically is False
    crl_item = by_key[f"crl:{issuing.id}"]
    assert crl_item.not_after == crl.next_update
    assert crl_item.renews_automatically is True
    assert by_key[f"ca:{root.id}"].not_after == root.not_after

    # expiring_within keeps what ends before now + the window.
    week = await pki.lifecycle.inventory(expiring_within=timedelta(days=7, hours=1))
    assert keys(week) == [f"certificate:{successor.serial}", f"crl:{issuing.id}"]
    assert all(i.not_after < clock.now() + timedelta(days=7, hours=1) for i in week)
    month = await pki.lifecycle.inventory(expiring_within=timedelta(days=25))
    assert keys(month) == keys(items)[:4]
    assert await pki.lifecycle.inventory(expiring_within=timedelta(hours=1)) == []


async def test_an_expired_certificate_leaves_the_inventory(pki: Services, clock: FakeClock) -> None:
    await add_device(pki, "brief")
    brief = await issue_csr(pki, "brief", timedelta(days=1))
    assert f"certificate:{brief.serial}" in keys(await pki.lifecycle.inventory())
    clock.advance(DAY - 1)
    assert f"certificate:{brief.serial}" in keys(await pki.lifecycle.inventory())
    clock.advance(1)
    assert f"certificate:{brief.serial}" not in keys(await pki.lifecycle.inventory())


async def test_a_renewal_is_overdue_only_a_few_maintenance_rounds_past_its_point(
    pki: Services, clock: FakeClock
) -> None:
    """What /metrics lists one by one and what the alerts wait for: a certificate fleetgate
    renews by itself counts as failing only once its renewal point is well past."""
    await issuing_ca(pki)
    for device in ("held", "csr"):
        await add_device(pki, device)
    _, held = await issue_held(pki, "held", timedelta(days=3))
    csr = await issue_csr(pki, "csr", timedelta(days=3))
    items = {i.id: i for i in await pki.lifecycle.inventory()}
    renewed_by_itself, from_csr = items[held.serial], items[csr.serial]
    assert renewed_by_itself.renew_by is not None
    assert from_csr.renew_by is None
    grace = timedelta(seconds=max(3 * pki.authority.config.maintenance_interval_s, 600))

    async def listed() -> set[str]:  # what /metrics lists one by one, and counts
        items = await pki.lifecycle.inventory(without_renewing_on_time=True)
        return {i.id for i in items if i.kind is ItemKind.CERTIFICATE}

    assert await pki.lifecycle.renewing_on_time() == 1
    assert await listed() == {csr.serial}
    clock.advance((renewed_by_itself.renew_by - clock.now()).total_seconds())  # its point
    assert not pki.lifecycle.renewal_overdue(renewed_by_itself, clock.now())
    clock.advance(grace.total_seconds() - 1)
    assert not pki.lifecycle.renewal_overdue(renewed_by_itself, clock.now())
    assert (await pki.lifecycle.renewing_on_time(), await listed()) == (1, {csr.serial})
    clock.advance(1)
    assert pki.lifecycle.renewal_overdue(renewed_by_itself, clock.now())
    assert not pki.lifecycle.renewal_overdue(from_csr, clock.now())  # nobody renews it here
    # The store's reading agrees with the service's rule, to the second.
    assert (await pki.lifecycle.renewing_on_time(), await listed()) == (
        0,
        {csr.serial, held.serial},
    )
