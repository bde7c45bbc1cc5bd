"""Schema migrations: applied once, recorded in the ledger, idempotent, safe to race."""

from __future__ import annotations

import asyncio

import pytest

from fleetgate.clock import FakeClock, to_epoch_us
from fleetgate.errors import ConfigError
from fleetgate.store import Database
from fleetgate.store.migrations import MIGRATIONS, applied_versions, migrate

from .conftest import Store
from .helpers import TABLES, count, rows, table_names

ALL_VERSIONS = [m.version for m in MIGRATIONS]


def test_versions_are_consecutive_from_one() -> None:
    assert list(range(1, len(MIGRATIONS) + 1)) == ALL_VERSIONS
    assert MIGRATIONS[0].name == "registry"


async def test_fresh_store_is_migrated_once_and_recorded(store: Store, clock: FakeClock) -> None:
    db = await store.open()
    assert await applied_versions(db) == []

    assert await migrate(db, clock) == ALL_VERSIONS
    assert await migrate(db, clock) == []

    assert await applied_versions(db) == ALL_VERSIONS
    ledger = await rows(db, "schema_migrations", "version")
    assert ledger == [
        {"version": m.version, "name": m.name, "applied_at": to_epoch_us(clock.now())}
        for m in MIGRATIONS
    ]
    assert ledger[0]["version"] == 1
    assert ledger[0]["name"] == "registry"


async def test_every_table_exists_and_is_empty_after_migration(db: Database) -> None:
    present = await table_names(db)
    assert set(TABLES) <= set(present)
    for table in present:
        expected = len(MIGRATIONS) if table == "schema_migrations" else 0
        assert await count(db, table) == expected, table


async def test_second_handle_sees_the_schema_and_applies_nothing(
    store: Store, db: Database, clock: FakeClock
) -> None:
    first_run = await rows(db, "schema_migrations", "version")
    other = await store.open()
    clock.advance(60)
    assert await migrate(other, clock) == []
    assert await applied_versions(other) == ALL_VERSIONS
    assert await rows(other, "schema_migrations", "version") == first_run  # times kept


async def test_concurrent_migrations_apply_each_version_exactly_once(
    store: Store, clock: FakeClock
) -> None:
    """Two nodes starting together on one empty store: every version is applied exactly once.

    BUG (src/fleetgate/store/migrations.py, applied_versions): migrate() is written for this
    ("Another node may be migrating at the same moment"), but on PostgreSQL two concurrent
    ``CREATE TABLE IF NOT EXISTS schema_migrations`` race on the catalog and the loser fails
    with IntegrityViolation (duplicate key in pg_type_typname_nsp_index) before it ever
    reaches the ledger insert that was meant to arbitrate.
    """
    first, second = await store.open(), await store.open()
    results = await asyncio.gather(migrate(first, clock), migrate(second, clock))
    # Each version is applied by exactly one of them (not necessarily all by the same one).
    assert sorted(v for applied in results for v in applied) == ALL_VERSIONS
    assert await applied_versions(first) == ALL_VERSIONS
    assert await count(first, "schema_migrations") == len(MIGRATIONS)


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
