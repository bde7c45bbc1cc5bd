"""The change feed every process follows: in order, once each, past holes, woken by NOTIFY."""

from __future__ import annotations

import asyncio

import pytest

from fleetgate.clock import FakeClock
from fleetgate.records import NewAuditEntry
from fleetgate.services.changes import ChangeFollower
from fleetgate.store import Database
from fleetgate.store.audit import AuditRepo
from fleetgate.store.changes import Change


async def _append(db: Database, clock: FakeClock, target: str) -> int:
    async with db.transaction() as tx:
        return await AuditRepo(tx).append(
            NewAuditEntry(
                actor="test", action="device.update", target_type="device", target_id=target
            ),
            clock.now(),
        )


async def _append_then_roll_back(db: Database, clock: FakeClock) -> None:
    async with db.transaction() as tx:
        await AuditRepo(tx).append(
            NewAuditEntry(actor="t", action="x", target_type="device", target_id="gone"),
            clock.now(),
        )
        raise RuntimeError("roll back")


async def test_follower_sees_each_change_once_in_order(db: Database, clock: FakeClock) -> None:
    await _append(db, clock, "before")
    follower = ChangeFollower(db, clock)
    await follower.start_from_now()
    seen: list[Change] = []

    async def record(change: Change) -> None:
        seen.append(change)

    follower.subscribe(record)
    ids = [await _append(db, clock, f"d{n}") for n in range(5)]
    await follower.poll_once()
    await follower.poll_once()
    assert [c.id for c in seen] == ids
    assert [c.target_id for c in seen] == [f"d{n}" for n in range(5)]
    assert follower.watermark == ids[-1]


async def test_a_hole_is_waited_for_then_skipped(db: Database, clock: FakeClock) -> None:
    follower = ChangeFollower(db, clock, gap_timeout_s=10)
    await follower.start_from_now()
    first = await _append(db, clock, "a")
    # A transaction that took an id and rolled back leaves a hole (PostgreSQL sequences do).
    with pytest.raises(RuntimeError, match="roll back"):
        await _append_then_roll_back(db, clock)
    third = await _append(db, clock, "c")
    handled = await follower.poll_once()
    assert [c.target_id for c in handled] == ["a", "c"]
    if third == first + 1:  # SQLite reuses the id: no hole at all
        assert follower.watermark == third
        return
    assert follower.watermark == first  # still waiting for the hole to fill
    clock.advance(11)
    assert await follower.poll_once() == []
    assert follower.watermark == third  # given up on the hole, nothing handled twice


async def test_postgres_notify_wakes_the_follower_at_once(db: Database, clock: FakeClock) -> None:
    woken = asyncio.Event()
    async with db.watch_changes(woken.set):
        await _append(db, clock, "x")
        if db.dialect == "sqlite":
            assert not woken.is_set()  # SQLite followers poll
            return
        async with asyncio.timeout(10):
            await woken.wait()
