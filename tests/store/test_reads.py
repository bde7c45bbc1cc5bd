"""``Database.read``: the data path's lookups, whole, on a consistent read-only view (SQLite: in
one trip to a thread of their own). Identical on both backends except where a test says."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fleetgate.clock import FakeClock
from fleetgate.errors import StoreUnavailable
from fleetgate.records import Device
from fleetgate.services.context import SYSTEM_CALLER
from fleetgate.services.devices import DeviceService, NewDevice
from fleetgate.services.groups import GroupService
from fleetgate.store import Database
from fleetgate.store.database import Tx
from fleetgate.store.devices import DeviceRepo
from fleetgate.store.migrations import migrate
from fleetgate.store.sqlite import SqliteDatabase

from .helpers import count


async def test_a_read_sees_what_was_committed_and_returns_what_its_work_returns(
    devices: DeviceService, db: Database
) -> None:
    created = await devices.create(
        SYSTEM_CALLER,
        NewDevice(id="dev-1", attributes={"imsi": "001010000000001"}, addresses=("10.0.0.7",)),
    )

    async def both(tx: Tx) -> tuple[Device | None, Device | None]:
        repo = DeviceRepo(tx)
        return await repo.get_by_address("10.0.0.7"), await repo.get("dev-2")

    assert await db.read(both) == (created, None)
    assert await devices.find_by_address("10.0.0.7") == created
    assert await devices.find("dev-1") == created


async def test_a_read_cannot_write_and_leaves_nothing_behind(
    devices: DeviceService, db: Database
) -> None:
    async def sneaky(tx: Tx) -> int:
        return await tx.execute("DELETE FROM devices")

    await devices.create(SYSTEM_CALLER, NewDevice(id="dev-1"))
    # SQLite: a TypeError before the statement; PostgreSQL: its read-only transaction refuses.
    with pytest.raises(Exception, match=r"(?i)read"):
        await db.read(sneaky)
    assert await count(db, "devices") == 1
    assert await devices.find("dev-1") is not None  # and the next read is served


async def test_a_failed_read_ends_its_transaction_and_the_next_one_is_served(
    devices: DeviceService, db: Database
) -> None:
    async def broken(tx: Tx) -> object:
        return await tx.fetchrow("SELECT no_such_column FROM devices")

    await devices.create(SYSTEM_CALLER, NewDevice(id="dev-1", addresses=("10.0.0.1",)))
    with pytest.raises(Exception, match="no_such_column"):
        await db.read(broken)
    await devices.create(SYSTEM_CALLER, NewDevice(id="dev-2", addresses=("10.0.0.2",)))
    found = await devices.find_by_address("10.0.0.2")  # not a snapshot from before dev-2
    assert found is not None
    assert found.id == "dev-2"


@pytest.fixture
async def sqlite_db(tmp_path: Path, clock: FakeClock) -> AsyncIterator[SqliteDatabase]:
    database = await SqliteDatabase.open(tmp_path / "reads.db")
    try:
        await migrate(database, clock)
        yield database
    finally:
        await database.close()


async def test_sqlite_runs_the_whole_read_on_its_lookups_thread(
    sqlite_db: SqliteDatabase, clock: FakeClock
) -> None:
    devices = DeviceService(sqlite_db, clock)
    await GroupService(sqlite_db, clock).ensure_default()
    await devices.create(SYSTEM_CALLER, NewDevice(id="dev-1", attributes={"imsi": "1"}))
    threads: list[str] = []

    async def watched(tx: Tx) -> Device | None:
        repo = DeviceRepo(tx)
        threads.append(threading.current_thread().name)
        owner = await repo.attribute_owner("imsi", "1")
        threads.append(threading.current_thread().name)
        found = await repo.get(owner) if owner is not None else None
        threads.append(threading.current_thread().name)
        return found

    found = await sqlite_db.read(watched)
    assert found is not None
    assert found.id == "dev-1"
    assert len(set(threads)) == 1, threads
    assert threads[0].startswith("sqlite-lookups"), threads


async def test_sqlite_refuses_a_read_that_waits_on_anything_else(
    sqlite_db: SqliteDatabase,
) -> None:
    async def waits(tx: Tx) -> None:
        await asyncio.sleep(0)  # suspends: it would run on the lookups thread, outside a loop

    with pytest.raises(RuntimeError, match="awaited something other than its statements"):
        await sqlite_db.read(waits)
    assert await sqlite_db.read(lambda tx: tx.fetchrow("SELECT 1 AS one")) == {"one": 1}


async def test_sqlite_reads_cannot_write_even_through_a_fetch(sqlite_db: SqliteDatabase) -> None:
    async def sneaky(tx: Tx) -> object:
        return await tx.fetchrow("DELETE FROM groups RETURNING name")

    before = await sqlite_db.read(lambda tx: tx.fetch("SELECT name FROM groups"))
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        await sqlite_db.read(sneaky)
    assert await sqlite_db.read(lambda tx: tx.fetch("SELECT name FROM groups")) == before


async def test_sqlite_reads_after_close_are_refused_not_reopened(tmp_path: Path) -> None:
    database = await SqliteDatabase.open(tmp_path / "closing.db")
    one = await database.read(lambda tx: tx.fetchrow("SELECT 1 AS one"))
    assert one == {"one": 1}
    queued = [
        asyncio.ensure_future(database.read(lambda tx: tx.fetchrow("SELECT 2 AS two")))
        for _ in range(3)
    ]
    await database.close()
    # They had not reached the thread when close() began: refused, and nothing reopened it.
    for result in await asyncio.gather(*queued, return_exceptions=True):
        assert isinstance(result, StoreUnavailable), result
    with pytest.raises(StoreUnavailable, match="closed"):
        await database.read(lambda tx: tx.fetchrow("SELECT 3 AS three"))
    assert database._lookups._conn is None
