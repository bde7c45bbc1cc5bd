"""The change feed: the audit log read in id order, since every change writes one entry in the
transaction that makes it."""

from __future__ import annotations

from dataclasses import dataclass

from fleetgate.store.database import Tx


@dataclass(frozen=True)
class Change:
    id: int
    action: str
    target_type: str
    target_id: str


class ChangeRepo:
    def __init__(self, tx: Tx) -> None:
        self._tx = tx

    async def latest_id(self) -> int:
        row = await self._tx.fetchrow("SELECT MAX(id) AS id FROM audit_log")
        return int(row["id"]) if row and row["id"] is not None else 0

    async def after(self, last_id: int, *, limit: int) -> list[Change]:
        rows = await self._tx.fetch(
            "SELECT id, action, target_type, target_id FROM audit_log WHERE id > ? "
            "ORDER BY id LIMIT ?",
            last_id,
            limit,
        )
        return [Change(int(r["id"]), r["action"], r["target_type"], r["target_id"]) for r in rows]
