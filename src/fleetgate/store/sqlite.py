"""The embedded backend: one file, WAL, ``synchronous=FULL`` so a confirmed write survives a crash.

sqlite3 blocks, so each connection lives on its own thread. One connection writes (transactions
in this process take turns on a lock; ``BEGIN IMMEDIATE`` makes other processes wait on SQLite's
lock), one reads; in WAL mode readers never wait for the writer.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from fleetgate.errors import StoreUnavailable
from fleetgate.store.database import IntegrityViolation, Row

BUSY_TIMEOUT_MS = 10_000


class _Connection:
    """A sqlite3 connection confined to one thread."""

    def __init__(self, path: Path, name: str) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sqlite-{name}")
        self._path = path
        self._conn: sqlite3.Connection | None = None
        self._closed = False
        self.lock = asyncio.Lock()

    def _open(self) -> None:
        conn = sqlite3.connect(
            self._path,
            isolation_level=None,
            check_same_thread=False,
            timeout=BUSY_TIMEOUT_MS / 1000,
        )
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        self._conn = conn

    async def call[T](self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            if self._conn is None:
                self._open()
            assert self._conn is not None
            try:
                return fn(self._conn)
            except sqlite3.IntegrityError as exc:
                raise IntegrityViolation(str(exc)) from None
            except sqlite3.OperationalError as exc:
                if "locked" in str(exc) or "busy" in str(exc) or "unable to open" in str(exc):
                    raise StoreUnavailable(f"sqlite: {exc}") from None
                raise

        return await asyncio.get_running_loop().run_in_executor(self._executor, run)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True

        def shut() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await asyncio.get_running_loop().run_in_executor(self._executor, shut)
        self._executor.shutdown(wait=True)


class SqliteTx:
    dialect: Literal["sqlite"] = "sqlite"

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn

    async def execute(self, sql: str, *args: Any) -> int:
        return await self._conn.call(lambda c: c.execute(sql, args).rowcount)

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return await self._conn.call(lambda c: [dict(r) for r in c.execute(sql, args).fetchall()])

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        def one(c: sqlite3.Connection) -> Row | None:
            cursor = c.execute(sql, args)
            row = cursor.fetchone()
            # Drain the statement so RETURNING and multi-row results finish executing.
            cursor.fetchall()
            return dict(row) if row is not None else None

        return await self._conn.call(one)

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        await self._conn.call(lambda c: c.executemany(sql, rows))


class SqliteDatabase:
    dialect: Literal["sqlite"] = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer = _Connection(path, "writer")
        self._reader = _Connection(path, "reader")

    @classmethod
    async def open(cls, path: Path) -> SqliteDatabase:
        db = cls(path)
        # The writer opens first so WAL mode is set before anyone reads.
        await db._writer.call(lambda c: c.execute("SELECT 1").fetchall())
        return db

    @asynccontextmanager
    async def _tx(self, conn: _Connection, begin: str) -> AsyncIterator[SqliteTx]:
        async with conn.lock:
            await conn.call(lambda c: c.execute(begin))
            try:
                yield SqliteTx(conn)
            except BaseException:
                await conn.call(lambda c: c.execute("ROLLBACK"))
                raise
            await conn.call(lambda c: c.execute("COMMIT"))

    def transaction(self) -> AbstractAsyncContextManager[SqliteTx]:
        return self._tx(self._writer, "BEGIN IMMEDIATE")

    def snapshot(self) -> AbstractAsyncContextManager[SqliteTx]:
        return self._tx(self._reader, "BEGIN")

    async def ping(self) -> None:
        try:
            await self._reader.call(lambda c: c.execute("SELECT 1").fetchall())
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"sqlite: {exc}") from None

    async def close(self) -> None:
        await self._reader.close()
        await self._writer.close()
