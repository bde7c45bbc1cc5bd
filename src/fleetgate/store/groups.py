"""Groups: named settings that devices share."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from fleetgate.clock import from_epoch_us, to_epoch_us
from fleetgate.records import Group
from fleetgate.store.database import Row, Tx

_COLUMNS = "name, description, settings, created_at, updated_at, revision"


def _group(row: Row) -> Group:
    return Group(
        name=row["name"],
        description=row["description"],
        settings=json.loads(row["settings"]),
        created_at=from_epoch_us(row["created_at"]),
        updated_at=from_epoch_us(row["updated_at"]),
        revision=int(row["revision"]),
    )


class GroupRepo:
    def __init__(self, tx: Tx) -> None:
        self._tx = tx

    async def get(self, name: str) -> Group | None:
        row = await self._tx.fetchrow(f"SELECT {_COLUMNS} FROM groups WHERE name = ?", name)
        return _group(row) if row else None

    async def insert(self, group: Group, *, if_absent: bool = False) -> bool:
        conflict = " ON CONFLICT (name) DO NOTHING" if if_absent else ""
        changed = await self._tx.execute(
            f"INSERT INTO groups ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?){conflict}",
            group.name,
            group.description,
            json.dumps(group.settings, sort_keys=True),
            to_epoch_us(group.created_at),
            to_epoch_us(group.updated_at),
            group.revision,
        )
        return changed == 1

    async def replace(self, group: Group, *, expected_revision: int) -> bool:
        changed = await self._tx.execute(
            "UPDATE groups SET description = ?, settings = ?, updated_at = ?, revision = ? "
            "WHERE name = ? AND revision = ?",
            group.description,
            json.dumps(group.settings, sort_keys=True),
            to_epoch_us(group.updated_at),
            group.revision,
            group.name,
            expected_revision,
        )
        return changed == 1

    async def delete(self, name: str) -> bool:
        return await self._tx.execute("DELETE FROM groups WHERE name = ?", name) == 1

    async def list(
        self, *, limit: int, after: str | None = None, within: Sequence[str] | None = None
    ) -> list[Group]:
        where: list[str] = []
        args: list[Any] = []
        if after is not None:
            where.append("name > ?")
            args.append(after)
        if within is not None:
            if not within:
                return []
            where.append(f"name IN ({', '.join('?' * len(within))})")
            args.extend(within)
        clause = ("WHERE " + " AND ".join(where)) if where else ""
        rows = await self._tx.fetch(
            f"SELECT {_COLUMNS} FROM groups {clause} ORDER BY name LIMIT ?", *args, limit
        )
        return [_group(r) for r in rows]
