"""The embedded backend: one file, WAL, ``synchronous=FULL`` so a confirmed write survives a crash.

sqlite3 blocks, so each connection lives on its own thread. One connection writes (transactions
in this process take turns on a lock; ``BEGIN IMMEDIATE`` makes other processes wait on SQLite's
lock), one reads; in WAL mode readers never wait for the writer.

Every trip to a connection's thread costs the event loop a wake-up (≈ 100 µs of CPU), so a
transaction's BEGIN rides along with its first statement, and a read snapshot's COMMIT is queued
on the thread without waiting for it (it runs before anything queued after it). A write's
COMMIT is awaited: the caller's answer waits for durability.

The data path's lookups (:meth:`SqliteDatabase.read`) go further: the whole lookup, BEGIN to
ROLLBACK with every statement in between, runs in one trip to a third connection's thread. A
first connection from a device makes several of them (the device, its credential, the
credential's certificate and sealed secret), and each trip was two context switches and a
wake-up of the loop.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from fleetgate.errors import StoreUnavailable
from fleetgate.logs import get_logger
from fleetgate.store.database import IntegrityViolation, Row

BUSY_TIMEOUT_MS = 10_000
log = get_logger("fleetgate.store")


class _Connection:
    """A sqlite3 connection confined to one thread."""

    def __init__(self, path: Path, name: str, *, query_only: bool = False) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sqlite-{name}")
        self._path = path
        self._query_only = query_only
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
        if self._query_only:
            conn.execute("PRAGMA query_only=ON")
        self._conn = conn

    def submit(self, fn: Callable[[sqlite3.Connection], object]) -> None:
        """Queue ``fn`` on the connection's thread without waiting for it."""

        def run() -> None:
            assert self._conn is not None
            try:
                fn(self._conn)
            except sqlite3.Error as exc:
                log.error("store.sqlite_background_failed", detail=str(exc))

        self._executor.submit(run)

    async def call[T](self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            if self._conn is None:
                if self._closed:  # queued behind close(): never opened again
                    raise StoreUnavailable("sqlite: the store is closed")
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

        try:
            done = asyncio.get_running_loop().run_in_executor(self._executor, run)
        except RuntimeError as exc:  # the executor is shut down: the store was closed
            if not self._closed:
                raise
            raise StoreUnavailable("sqlite: the store is closed") from exc
        return await done

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

    def __init__(self, conn: _Connection, begin: str) -> None:
        self._conn = conn
        self._begin: str | None = begin  # sent with the first statement
        self.begun = False

    async def _call[T](self, fn: Callable[[sqlite3.Connection], T]) -> T:
        begin = self._begin
        if begin is None:
            return await self._conn.call(fn)
        self._begin = None

        def with_begin(c: sqlite3.Connection) -> T:
            c.execute(begin)
            self.begun = True
            return fn(c)

        return await self._conn.call(with_begin)

    async def execute(self, sql: str, *args: Any) -> int:
        return await self._call(lambda c: _execute(c, sql, args))

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return await self._call(lambda c: _fetch(c, sql, args))

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        return await self._call(lambda c: _fetchrow(c, sql, args))

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        await self._call(lambda c: c.executemany(sql, rows))


def _execute(c: sqlite3.Connection, sql: str, args: tuple[Any, ...]) -> int:
    return c.execute(sql, args).rowcount


def _fetch(c: sqlite3.Connection, sql: str, args: tuple[Any, ...]) -> list[Row]:
    return [dict(r) for r in c.execute(sql, args).fetchall()]


def _fetchrow(c: sqlite3.Connection, sql: str, args: tuple[Any, ...]) -> Row | None:
    cursor = c.execute(sql, args)
    row = cursor.fetchone()
    # Drain the statement so RETURNING and multi-row results finish executing.
    cursor.fetchall()
    return dict(row) if row is not None else None


class _HereTx:
    """The view :meth:`SqliteDatabase.read` hands its work: statements run where they are
    awaited, on the connection's thread, so the work completes without suspending."""

    dialect: Literal["sqlite"] = "sqlite"

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    async def execute(self, sql: str, *args: Any) -> int:
        raise TypeError("a read does not write")

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return _fetch(self._conn, sql, args)

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        return _fetchrow(self._conn, sql, args)

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        raise TypeError("a read does not write")


def _complete[T](work: Coroutine[Any, Any, T]) -> T:
    """What ``work`` returns; it must not suspend (every await in it is a statement of a
    :class:`_HereTx`, which has already run)."""
    try:
        work.send(None)
    except StopIteration as done:
        result: T = done.value
        return result
    work.close()
    raise RuntimeError("a read awaited something other than its statements")


class SqliteDatabase:
    dialect: Literal["sqlite"] = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer = _Connection(path, "writer")
        self._reader = _Connection(path, "reader")
        # read(): whole transactions, one trip each; it cannot write, whatever it is given.
        self._lookups = _Connection(path, "lookups", query_only=True)

    @classmethod
    async def open(cls, path: Path) -> SqliteDatabase:
        db = cls(path)
        # The writer opens first so WAL mode is set before anyone reads.
        await db._writer.call(lambda c: c.execute("SELECT 1").fetchall())
        return db

    @asynccontextmanager
    async def _tx(
        self, conn: _Connection, begin: str, *, wait_commit: bool
    ) -> AsyncIterator[SqliteTx]:
        async with conn.lock:
            tx = SqliteTx(conn, begin)
            try:
                yield tx
            except BaseException:
                if tx.begun:
                    await conn.call(lambda c: c.execute("ROLLBACK"))
                raise
            if not tx.begun:
                return
            if wait_commit:
                await conn.call(lambda c: c.execute("COMMIT"))
            else:
                # Ends a read snapshot; queued before anything the next holder of the lock sends.
                conn.submit(lambda c: c.execute("COMMIT"))

    def transaction(self) -> AbstractAsyncContextManager[SqliteTx]:
        return self._tx(self._writer, "BEGIN IMMEDIATE", wait_commit=True)

    def snapshot(self) -> AbstractAsyncContextManager[SqliteTx]:
        return self._tx(self._reader, "BEGIN", wait_commit=False)

    async def read[T](self, work: Callable[[_HereTx], Coroutine[Any, Any, T]]) -> T:
        def run(c: sqlite3.Connection) -> T:
            c.execute("BEGIN")
            try:
                return _complete(work(_HereTx(c)))
            finally:
                if c.in_transaction:  # a read: nothing to keep, and nothing to undo
                    c.execute("ROLLBACK")

        return await self._lookups.call(run)

    @asynccontextmanager
    async def watch_changes(self, wake: Callable[[], None]) -> AsyncIterator[None]:
        """SQLite has no cross-process notification; followers poll."""
        del wake
        yield

    async def ping(self) -> None:
        try:
            await self._reader.call(lambda c: c.execute("SELECT 1").fetchall())
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"sqlite: {exc}") from None

    async def close(self) -> None:
        await self._lookups.close()
        await self._reader.close()
        await self._writer.close()
