"""Schema migrations: applied once, recorded in the ledger, idempotent, safe to race."""

from __future__ import annotations

import asyncio

import pytest

from fleetgate.clock import FakeClock, to_epoch_us
from fleetgate.errors import ConfigError
from fleetgate.store import Database
from fleetgate.store.migrations import MIGRATIONS, applied_versions, migrate

from .conftest import Store
from .helpers import TABLES, count, rows


async def test_fresh_store_is_migrated_once_and_recorded(store: Store, clock: FakeClock) -> None:
    db = await store.open()
    assert await applied_versions(db) == []

    assert await migrate(db, clock) == [1]
    assert await migrate(db, clock) == []

    assert await applied_versions(db) == [1]
    ledger = await rows(db, "schema_migrations", "version")
    assert ledger == [{"version": 1, "name": "registry", "applied_at": to_epoch_us(clock.now())}]
    assert [m.version for m in MIGRATIONS] == [1]


async def test_every_table_exists_and_is_empty_after_migration(db: Database) -> None:
    for table in TABLES:
        expected = 1 if table == "schema_migrations" else 0
        assert await count(db, table) == expected, table


async def test_second_handle_sees_the_schema_and_applies_nothing(
    store: Store, db: Database, clock: FakeClock
) -> None:
    other = await store.open()
    clock.advance(60)
    assert await migrate(other, clock) == []
    assert await applied_versions(other) == [1]
    (ledger,) = await rows(other, "schema_migrations")
    assert ledger["applied_at"] == to_epoch_us(clock.now()) - 60_000  # the first run's time, kept


async def test_concurrent_migrations_apply_each_version_exactly_once(
    store: Store, clock: FakeClock
) -> None:
    """Two nodes starting together on one empty store: one applies, the other applies nothing.

    migrations.py says "Another node may be migrating at the same moment"; both must succeed.
    """
    first, second = await store.open(), await store.open()
    results = await asyncio.gather(migrate(first, clock), migrate(second, clock))
    assert sorted(results) == [[], [1]]
    assert await applied_versions(first) == [1]
    assert await count(first, "schema_migrations") == 1


async def test_store_newer_than_this_code_is_refused(db: Database, clock: FakeClock) -> None:
    async with db.transaction() as tx:
        await tx.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
            MIGRATIONS[-1].version + 1,
            "from the future",
            0,
        )
    with pytest.raises(ConfigError, match="newer than this fleetgate knows"):
        await migrate(db, clock)
