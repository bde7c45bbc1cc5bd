"""What every backend offers: transactions of SQL written once for both.

Queries use ``?`` placeholders and the common subset of SQLite and PostgreSQL SQL (``ON
CONFLICT``, ``RETURNING``, partial indexes). A backend translates placeholders and errors; the
repositories in this package never know which backend they run on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Coroutine, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Literal, Protocol

from fleetgate.errors import StoreUnavailable

Row = Mapping[str, Any]
Dialect = Literal["sqlite", "postgresql"]


class IntegrityViolation(Exception):
    """A constraint refused a write (unique, foreign key, check, append-only trigger)."""


class Tx(Protocol):
    @property
    def dialect(self) -> Dialect: ...

    async def execute(self, sql: str, *args: Any) -> int:
        """Run a statement; the number of rows it changed."""
        ...

    async def fetch(self, sql: str, *args: Any) -> list[Row]: ...

    async def fetchrow(self, sql: str, *args: Any) -> Row | None: ...

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...


class Database(Protocol):
    @property
    def dialect(self) -> Dialect: ...

    def transaction(self) -> AbstractAsyncContextManager[Tx]:
        """A read-write transaction; committed (and durable) when the block exits normally."""
        ...

    def snapshot(self) -> AbstractAsyncContextManager[Tx]:
        """A read-only, consistent view."""
        ...

    async def read[T](self, work: Callable[[Tx], Coroutine[Any, Any, T]]) -> T:
        """``work`` on a read-only, consistent view, whole: the data path's lookups. It may
        await only the view's statements (SQLite runs all of it in one trip to a thread of
        its own, where a snapshot costs a trip per statement)."""
        ...

    async def ping(self) -> None:
        """Raise :class:`StoreUnavailable` unless a trivial query succeeds."""
        ...

    def watch_changes(self, wake: Callable[[], None]) -> AbstractAsyncContextManager[None]:
        """While open, call ``wake`` soon after any process commits a change (best effort:
        followers poll as well)."""
        ...

    async def close(self) -> None: ...


async def lock_table(tx: Tx, table: str) -> None:
    """Serialize writers of ``table`` until the transaction ends.

    SQLite needs nothing: ``BEGIN IMMEDIATE`` already gives one writer at a time. PostgreSQL
    takes a lock that conflicts with itself and with writers, but not with readers.
    """
    if tx.dialect == "postgresql":
        await tx.execute(f"LOCK TABLE {table} IN SHARE ROW EXCLUSIVE MODE")


def lock_key(name: str) -> int:
    """A stable 64-bit lock number for a name."""
    digest = hashlib.sha256(b"fleetgate lock\0" + name.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


async def advisory_lock(tx: Tx, key: int) -> None:
    """A transaction-scoped lock on a number (PostgreSQL); SQLite's writer lock suffices."""
    if tx.dialect == "postgresql":
        await tx.execute("SELECT pg_advisory_xact_lock(?)", key)


def to_dollar_placeholders(sql: str) -> str:
    """``?`` -> ``$1``, ``$2``… (our SQL never has a ``?`` inside a literal)."""
    parts = sql.split("?")
    out = [parts[0]]
    for number, part in enumerate(parts[1:], start=1):
        out.append(f"${number}")
        out.append(part)
    return "".join(out)


__all__ = ["Database", "Dialect", "IntegrityViolation", "Row", "StoreUnavailable", "Tx"]
