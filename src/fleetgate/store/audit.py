"""The append-only audit log (the schema refuses UPDATE and DELETE on it)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fleetgate.clock import from_epoch_us, to_epoch_us
from fleetgate.records import AuditEntry, NewAuditEntry
from fleetgate.store.database import Row, Tx

_COLUMNS = (
    "id, at, actor, action, target_type, target_id, group_name, request_id, source, "
    "before_json, after_json"
)


def _entry(row: Row) -> AuditEntry:
    return AuditEntry(
        id=int(row["id"]),
        at=from_epoch_us(row["at"]),
        actor=row["actor"],
        action=row["action"],
        target_type=row["target_type"],
        target_id=row["target_id"],
        group=row["group_name"],
        request_id=row["request_id"],
        source=row["source"],
        before=json.loads(row["before_json"]) if row["before_json"] else None,
        after=json.loads(row["after_json"]) if row["after_json"] else None,
    )


@dataclass(frozen=True)
class AuditFilter:
    action: str | None = None
    target_type: str | None = None
    target_id: str | None = None
    actor: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    within_groups: Sequence[str] | None = None


class AuditRepo:
    def __init__(self, tx: Tx) -> None:
        self._tx = tx

    async def append(self, entry: NewAuditEntry, at: datetime) -> int:
        row = await self._tx.fetchrow(
            "INSERT INTO audit_log (at, actor, action, target_type, target_id, group_name, "
            "request_id, source, before_json, after_json) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            to_epoch_us(at),
            entry.actor,
            entry.action,
            entry.target_type,
            entry.target_id,
            entry.group,
            entry.request_id,
            entry.source,
            json.dumps(entry.before, sort_keys=True) if entry.before is not None else None,
            json.dumps(entry.after, sort_keys=True) if entry.after is not None else None,
        )
        assert row is not None
        return int(row["id"])

    async def list(
        self, query: AuditFilter, *, limit: int, before_id: int | None = None
    ) -> list[AuditEntry]:
        """Newest first; ``before_id`` continues a previous page."""
        where: list[str] = []
        args: list[Any] = []
        for column, value in (
            ("action", query.action),
            ("target_type", query.target_type),
            ("target_id", query.target_id),
            ("actor", query.actor),
        ):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if query.since is not None:
            where.append("at >= ?")
            args.append(to_epoch_us(query.since))
        if query.until is not None:
            where.append("at < ?")
            args.append(to_epoch_us(query.until))
        if query.within_groups is not None:
            if not query.within_groups:
                return []
            where.append(f"group_name IN ({', '.join('?' * len(query.within_groups))})")
            args.extend(query.within_groups)
        if before_id is not None:
            where.append("id < ?")
            args.append(before_id)
        clause = ("WHERE " + " AND ".join(where)) if where else ""
        rows = await self._tx.fetch(
            f"SELECT {_COLUMNS} FROM audit_log {clause} ORDER BY id DESC LIMIT ?", *args, limit
        )
        return [_entry(r) for r in rows]
