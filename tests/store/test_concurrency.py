"""A light check of concurrent use and durability, identical on both backends."""

from __future__ import annotations

import asyncio

import pytest

from fleetgate.clock import FakeClock
from fleetgate.errors import Conflict, PreconditionFailed
from fleetgate.records import Device
from fleetgate.services.context import SYSTEM_CALLER
from fleetgate.services.devices import DevicePatch, DeviceQuery, DeviceService, NewDevice
from fleetgate.services.groups import GroupService
from fleetgate.store import Database

from .conftest import Store
from .helpers import audit_entries, count, warm_up


async def test_concurrent_creates_all_succeed_and_are_listed(
    devices: DeviceService, db: Database
) -> None:
    specs = [
        NewDevice(
            id=f"dev-{n:02d}",
            attributes={"imsi": f"0010100000{n:05d}"},
            addresses=(f"10.1.0.{n + 1}",),
        )
        for n in range(20)
    ]
    await warm_up(db)
    created = await asyncio.gather(*(devices.create(SYSTEM_CALLER, s) for s in specs))
    assert sorted(d.id for d in created) == [s.id for s in specs]

    page = await devices.list(SYSTEM_CALLER, DeviceQuery(), limit=100, cursor=None)
    assert [d.id for d in page.items] == [s.id for s in specs]
    assert sorted(page.items, key=lambda d: d.id) == sorted(created, key=lambda d: d.id)
    entries = await audit_entries(db, action="device.create")
    assert sorted(e.target_id for e in entries) == [s.id for s in specs]
    assert len({e.id for e in entries}) == 20


async def test_concurrent_claims_on_one_address_admit_exactly_one(
    devices: DeviceService, db: Database
) -> None:
    await warm_up(db)
    results = await asyncio.gather(
        *(
            devices.create(SYSTEM_CALLER, NewDevice(id=f"dev-{n}", addresses=("10.0.0.1",)))
            for n in range(6)
        ),
        return_exceptions=True,
    )
    winners = [r for r in results if isinstance(r, Device)]
    losers = [r for r in results if not isinstance(r, Device)]
    assert len(winners) == 1
    assert all(isinstance(r, Conflict) for r in losers), losers
    assert await devices.find_by_address("10.0.0.1") == winners[0]
    assert await count(db, "devices") == 1
    assert await count(db, "audit_log") == 1


async def test_concurrent_creates_of_one_id_admit_exactly_one(
    devices: DeviceService, db: Database
) -> None:
    await warm_up(db)
    results = await asyncio.gather(
        *(devices.create(SYSTEM_CALLER, NewDevice(id="dev-1", name=f"n{n}")) for n in range(6)),
        return_exceptions=True,
    )
    assert sum(isinstance(r, Device) for r in results) == 1
    assert all(isinstance(r, Device | Conflict) for r in results), results
    assert await count(db, "devices") == 1
    assert await count(db, "audit_log") == 1


async def test_concurrent_updates_never_lose_a_write(devices: DeviceService, db: Database) -> None:
    await devices.create(SYSTEM_CALLER, NewDevice(id="dev-1"))
    await warm_up(db)
    keys = [f"k{n}" for n in range(5)]
    results = await asyncio.gather(
        *(devices.update(SYSTEM_CALLER, "dev-1", DevicePatch(attributes={k: "v"})) for k in keys),
        return_exceptions=True,
    )
    applied = {k for k, r in zip(keys, results, strict=True) if isinstance(r, Device)}
    refused = [r for r in results if not isinstance(r, Device)]
    assert all(isinstance(r, PreconditionFailed) for r in refused), refused
    final = await devices.get(SYSTEM_CALLER, "dev-1")
    assert set(final.attributes) == applied  # every acknowledged write is there, no other
    assert final.revision == 1 + len(applied)


async def test_concurrent_conditional_updates_admit_exactly_one(
    devices: DeviceService, db: Database
) -> None:
    await devices.create(SYSTEM_CALLER, NewDevice(id="dev-1"))
    await warm_up(db)
    results = await asyncio.gather(
        *(
            devices.update(SYSTEM_CALLER, "dev-1", DevicePatch(name=f"n{n}"), if_revision=1)
            for n in range(4)
        ),
        return_exceptions=True,
    )
    winners = [r for r in results if isinstance(r, Device)]
    assert len(winners) == 1
    assert all(isinstance(r, PreconditionFailed) for r in results if r not in winners), results
    assert await devices.get(SYSTEM_CALLER, "dev-1") == winners[0]


async def test_concurrent_updates_claiming_one_address_admit_exactly_one(
    devices: DeviceService, db: Database
) -> None:
    """Two devices re-addressed to the same address at once: one wins, the other is a Conflict.

    BUG (src/fleetgate/services/devices.py, DeviceService.update): unlike ``create``, ``update``
    does not translate the store's IntegrityViolation into Conflict. On PostgreSQL (read
    committed) both updates pass ``_check_unique`` before either inserts, and the loser gets a
    raw ``IntegrityViolation`` from the primary key of device_addresses instead of a Conflict.
    """
    await devices.create(SYSTEM_CALLER, NewDevice(id="dev-1", addresses=("10.0.0.1",)))
    await devices.create(SYSTEM_CALLER, NewDevice(id="dev-2", addresses=("10.0.0.2",)))
    await warm_up(db)
    results = await asyncio.gather(
        devices.update(SYSTEM_CALLER, "dev-1", DevicePatch(addresses=("10.0.0.9",))),
        devices.update(SYSTEM_CALLER, "dev-2", DevicePatch(addresses=("10.0.0.9",))),
        return_exceptions=True,
    )
    winners = [r for r in results if isinstance(r, Device)]
    losers = [r for r in results if not isinstance(r, Device)]
    assert len(winners) == 1
    assert len(losers) == 1
    assert isinstance(losers[0], Conflict), repr(losers[0])
    assert await devices.find_by_address("10.0.0.9") == winners[0]


async def test_committed_writes_survive_closing_and_reopening(
    store: Store, db: Database, clock: FakeClock
) -> None:
    service = DeviceService(db, clock)
    await GroupService(db, clock).ensure_default()
    await service.create(SYSTEM_CALLER, NewDevice(id="dev-1", attributes={"imei": "1"}))
    await service.update(SYSTEM_CALLER, "dev-1", DevicePatch(name="kept"))
    await store.close(db)

    reopened = await store.open()
    again = DeviceService(reopened, clock)
    device = await again.get(SYSTEM_CALLER, "dev-1")
    assert (device.name, dict(device.attributes), device.revision) == ("kept", {"imei": "1"}, 2)
    assert await count(reopened, "audit_log") == 2


async def test_a_snapshot_does_not_see_a_commit_made_while_it_is_open(
    devices: DeviceService, db: Database
) -> None:
    await devices.create(SYSTEM_CALLER, NewDevice(id="dev-1"))
    async with db.snapshot() as tx:
        first = await tx.fetch("SELECT id FROM devices ORDER BY id")
        # Another writer commits while the snapshot is open.
        await devices.create(SYSTEM_CALLER, NewDevice(id="dev-2"))
        second = await tx.fetch("SELECT id FROM devices ORDER BY id")
    assert first == second == [{"id": "dev-1"}]
    async with db.snapshot() as tx:
        assert await tx.fetch("SELECT id FROM devices ORDER BY id") == [
            {"id": "dev-1"},
            {"id": "dev-2"},
        ]


_INSERT_GROUP = (
    "INSERT INTO groups (name, description, settings, created_at, updated_at, revision) "
    "VALUES (?, ?, ?, 0, 0, 1)"
)


class _Abort(Exception):
    pass


async def test_a_failed_transaction_leaves_nothing_behind(db: Database) -> None:
    async def insert_then_fail() -> None:
        async with db.transaction() as tx:
            await tx.execute(_INSERT_GROUP, "half", "", "{}")
            raise _Abort

    with pytest.raises(_Abort):
        await insert_then_fail()
    assert await count(db, "groups") == 0
    # And the store takes the next transaction normally.
    async with db.transaction() as tx:
        assert await tx.execute(_INSERT_GROUP, "whole", "", "{}") == 1
    assert await count(db, "groups") == 1
