"""Fixtures for the store contract suite: every test runs once on SQLite and once on PostgreSQL.

``store`` names one empty store (a SQLite file, or a fresh PostgreSQL database on the session's
throwaway server) and can open several handles on it; ``db`` is one opened, migrated handle.

The session-scoped ``pg_server`` fixture (a throwaway server from ``support.postgres``, failing,
never skipping, when PostgreSQL is not installed) lives in ``tests/conftest.py``, shared with the
end-to-end suite. It is requested lazily, so ``-m "not postgres"`` starts no server.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fleetgate.clock import FakeClock
from fleetgate.services.audit import AuditService
from fleetgate.services.devices import DeviceService
from fleetgate.services.groups import GroupService
from fleetgate.services.tokens import TokenService
from fleetgate.store import Database
from fleetgate.store.database import Dialect
from fleetgate.store.migrations import migrate
from fleetgate.store.postgres import PostgresDatabase
from fleetgate.store.sqlite import SqliteDatabase
from support.postgres import PostgresServer

BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgres),
]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@dataclass
class Store:
    """One empty store; :meth:`open` gives another handle (another pool, another file handle)."""

    dialect: Dialect
    _opener: Callable[[], Awaitable[Database]]
    _handles: list[Database] = field(default_factory=list)

    async def open(self) -> Database:
        handle = await self._opener()
        self._handles.append(handle)
        return handle

    async def close(self, handle: Database) -> None:
        """Close one handle now (a backend's ``close`` need not be idempotent)."""
        self._handles.remove(handle)
        await handle.close()

    async def close_all(self) -> None:
        while self._handles:
            await self._handles.pop().close()


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "sqlite":
        path = tmp_path / "t.db"

        async def open_sqlite() -> Database:
            return await SqliteDatabase.open(path)

        sqlite_store = Store("sqlite", open_sqlite)
        try:
            yield sqlite_store
        finally:
            await sqlite_store.close_all()
        return

    server: PostgresServer = request.getfixturevalue("pg_server")
    dsn = await server.create_database()

    async def open_postgres() -> Database:
        return await PostgresDatabase.open(dsn, pool_max=5, timeout_s=10)

    pg_store = Store("postgresql", open_postgres)
    try:
        yield pg_store
    finally:
        await pg_store.close_all()
        await server.drop_database(dsn)


@pytest.fixture
async def db(store: Store, clock: FakeClock) -> Database:
    """An opened, migrated database (closed by ``store`` at the end of the test)."""
    database = await store.open()
    assert database.dialect == store.dialect
    await migrate(database, clock)
    return database


@pytest.fixture
async def groups(db: Database, clock: FakeClock) -> GroupService:
    service = GroupService(db, clock)
    await service.ensure_default()
    return service


@pytest.fixture
def devices(db: Database, clock: FakeClock, groups: GroupService) -> DeviceService:
    return DeviceService(db, clock)


@pytest.fixture
def tokens(db: Database, clock: FakeClock) -> TokenService:
    return TokenService(db, clock)


@pytest.fixture
def audit(db: Database) -> AuditService:
    return AuditService(db)
