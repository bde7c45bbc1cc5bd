"""The shared backend for several gateway nodes: PostgreSQL through an asyncpg pool."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Literal

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from fleetgate.errors import StoreUnavailable
from fleetgate.store.database import IntegrityViolation, Row, to_dollar_placeholders

CHANGES_CHANNEL = "fleetgate_changes"
_UNAVAILABLE = (OSError, asyncpg.CannotConnectNowError, asyncpg.ConnectionDoesNotExistError)


def _translated[T](coro: Awaitable[T]) -> Awaitable[T]:
    async def run() -> T:
        try:
            return await coro
        except (asyncpg.IntegrityConstraintViolationError, asyncpg.RaiseError) as exc:
            raise IntegrityViolation(str(exc)) from None

    return run()


class PostgresTx:
    dialect: Literal["postgresql"] = "postgresql"

    def __init__(self, conn: asyncpg.Connection | PoolConnectionProxy) -> None:
        self._conn = conn

    async def execute(self, sql: str, *args: Any) -> int:
        status = await _translated(self._conn.execute(to_dollar_placeholders(sql), *args))
        # "UPDATE 3", "INSERT 0 1", "DELETE 0"
        tail = status.rsplit(" ", 1)[-1]
        return int(tail) if tail.isdigit() else 0

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        rows = await _translated(self._conn.fetch(to_dollar_placeholders(sql), *args))
        return [dict(r) for r in rows]

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        row = await _translated(self._conn.fetchrow(to_dollar_placeholders(sql), *args))
        return dict(row) if row is not None else None

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        await _translated(self._conn.executemany(to_dollar_placeholders(sql), rows))


class PostgresDatabase:
    dialect: Literal["postgresql"] = "postgresql"

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @classmethod
    async def open(cls, dsn: str, *, pool_max: int, timeout_s: float) -> PostgresDatabase:
        try:
            pool = await asyncpg.create_pool(
                dsn, min_size=1, max_size=pool_max, timeout=timeout_s, command_timeout=60
            )
        except (*_UNAVAILABLE, asyncpg.PostgresError, TimeoutError) as exc:
            # The DSN may carry a password: name the failure, never the DSN.
            raise StoreUnavailable(
                f"postgresql: cannot connect: {type(exc).__name__}: {exc}"
            ) from None
        return cls(pool)

    @asynccontextmanager
    async def _tx(self, *, readonly: bool) -> AsyncIterator[PostgresTx]:
        try:
            conn = await self._pool.acquire()
        except (*_UNAVAILABLE, TimeoutError) as exc:
            raise StoreUnavailable(f"postgresql: {type(exc).__name__}: {exc}") from None
        try:
            async with conn.transaction(
                isolation="repeatable_read" if readonly else "read_committed", readonly=readonly
            ):
                yield PostgresTx(conn)
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"postgresql: {type(exc).__name__}: {exc}") from None
        finally:
            await asyncio.shield(self._pool.release(conn))

    def transaction(self) -> AbstractAsyncContextManager[PostgresTx]:
        return self._tx(readonly=False)

    def snapshot(self) -> AbstractAsyncContextManager[PostgresTx]:
        return self._tx(readonly=True)

    async def read[T](self, work: Callable[[PostgresTx], Coroutine[Any, Any, T]]) -> T:
        async with self.snapshot() as tx:
            return await work(tx)

    @asynccontextmanager
    async def watch_changes(self, wake: Callable[[], None]) -> AsyncIterator[None]:
        """LISTEN on a connection of its own; the audit log's trigger NOTIFYs on every insert."""
        conn = await self._pool.acquire()

        def notified(*_: object) -> None:
            wake()

        try:
            await conn.add_listener(CHANGES_CHANNEL, notified)
            try:
                yield
            finally:
                await conn.remove_listener(CHANGES_CHANNEL, notified)
        finally:
            await asyncio.shield(self._pool.release(conn))

    async def ping(self) -> None:
        try:
            async with self._pool.acquire() as conn:
                await conn.fetchval("SELECT 1")
        except (*_UNAVAILABLE, asyncpg.PostgresError, TimeoutError) as exc:
            raise StoreUnavailable(f"postgresql: {type(exc).__name__}: {exc}") from None

    async def close(self) -> None:
        await self._pool.close()
