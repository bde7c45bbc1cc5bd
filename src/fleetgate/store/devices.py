"""Devices, their attributes, their routes and the addresses that identify them."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from fleetgate.clock import from_epoch_us, to_epoch_us
from fleetgate.records import Device, DeviceStatus
from fleetgate.store.database import Row, Tx

_COLUMNS = "id, name, group_name, status, created_at, updated_at, revision, routes"


def _marks(count: int) -> str:
    return ", ".join("?" * count)


def _routes_json(routes: Mapping[str, str]) -> str:
    return json.dumps(dict(routes), sort_keys=True, separators=(",", ":"))


class DeviceRepo:
    def __init__(self, tx: Tx) -> None:
        self._tx = tx

    async def _hydrate(self, rows: list[Row]) -> list[Device]:
        if not rows:
            return []
        ids = [r["id"] for r in rows]
        attributes: dict[str, dict[str, str]] = {i: {} for i in ids}
        addresses: dict[str, list[str]] = {i: [] for i in ids}
        for r in await self._tx.fetch(
            "SELECT device_id, key, value FROM device_attributes "
            f"WHERE device_id IN ({_marks(len(ids))})",
            *ids,
        ):
            attributes[r["device_id"]][r["key"]] = r["value"]
        for r in await self._tx.fetch(
            "SELECT device_id, address FROM device_addresses "
            f"WHERE device_id IN ({_marks(len(ids))})",
            *ids,
        ):
            addresses[r["device_id"]].append(r["address"])
        return [
            Device(
                id=r["id"],
                name=r["name"],
                group=r["group_name"],
                status=DeviceStatus(r["status"]),
                attributes=dict(sorted(attributes[r["id"]].items())),
                # Sorted here, not by the database, whose collation may not be code-point order.
                addresses=tuple(sorted(addresses[r["id"]])),
                created_at=from_epoch_us(r["created_at"]),
                updated_at=from_epoch_us(r["updated_at"]),
                revision=int(r["revision"]),
                routes=dict(sorted(json.loads(r["routes"]).items())),
            )
            for r in rows
        ]

    async def get(self, device_id: str) -> Device | None:
        rows = await self._tx.fetch(f"SELECT {_COLUMNS} FROM devices WHERE id = ?", device_id)
        found = await self._hydrate(rows)
        return found[0] if found else None

    async def get_by_address(self, address: str) -> Device | None:
        row = await self._tx.fetchrow(
            "SELECT device_id FROM device_addresses WHERE address = ?", address
        )
        return await self.get(row["device_id"]) if row else None

    async def address_owners(self, addresses: Sequence[str]) -> dict[str, str]:
        if not addresses:
            return {}
        rows = await self._tx.fetch(
            "SELECT address, device_id FROM device_addresses "
            f"WHERE address IN ({_marks(len(addresses))})",
            *addresses,
        )
        return {r["address"]: r["device_id"] for r in rows}

    async def attribute_owner(self, key: str, value: str) -> str | None:
        row = await self._tx.fetchrow(
            "SELECT device_id FROM device_attributes WHERE key = ? AND value = ? LIMIT 1",
            key,
            value,
        )
        return row["device_id"] if row else None

    async def insert(self, device: Device) -> None:
        await self._tx.execute(
            f"INSERT INTO devices ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            device.id,
            device.name,
            device.group,
            device.status.value,
            to_epoch_us(device.created_at),
            to_epoch_us(device.updated_at),
            device.revision,
            _routes_json(device.routes),
        )
        await self._write_children(device)

    async def _write_children(self, device: Device) -> None:
        if device.attributes:
            await self._tx.executemany(
                "INSERT INTO device_attributes (device_id, key, value) VALUES (?, ?, ?)",
                [(device.id, k, v) for k, v in device.attributes.items()],
            )
        if device.addresses:
            await self._tx.executemany(
                "INSERT INTO device_addresses (address, device_id) VALUES (?, ?)",
                [(a, device.id) for a in device.addresses],
            )

    async def replace(self, device: Device, *, expected_revision: int) -> bool:
        """Write ``device`` over the stored one if nobody changed it since ``expected_revision``."""
        changed = await self._tx.execute(
            "UPDATE devices SET name = ?, group_name = ?, status = ?, updated_at = ?, "
            "revision = ?, routes = ? WHERE id = ? AND revision = ?",
            device.name,
            device.group,
            device.status.value,
            to_epoch_us(device.updated_at),
            device.revision,
            _routes_json(device.routes),
            device.id,
            expected_revision,
        )
        if changed != 1:
            return False
        await self._tx.execute("DELETE FROM device_attributes WHERE device_id = ?", device.id)
        await self._tx.execute("DELETE FROM device_addresses WHERE device_id = ?", device.id)
        await self._write_children(device)
        return True

    async def delete(self, device_id: str) -> bool:
        return await self._tx.execute("DELETE FROM devices WHERE id = ?", device_id) == 1

    async def list(
        self,
        *,
        limit: int,
        after: str | None = None,
        within_groups: Sequence[str] | None = None,
        group: str | None = None,
        status: DeviceStatus | None = None,
        attributes: Mapping[str, str] | None = None,
        address: str | None = None,
    ) -> list[Device]:
        """Devices ordered by id, at most ``limit``, starting after the id ``after``."""
        where: list[str] = []
        args: list[Any] = []
        if after is not None:
            where.append("d.id > ?")
            args.append(after)
        if within_groups is not None:
            if not within_groups:
                return []
            where.append(f"d.group_name IN ({_marks(len(within_groups))})")
            args.extend(within_groups)
        if group is not None:
            where.append("d.group_name = ?")
            args.append(group)
        if status is not None:
            where.append("d.status = ?")
            args.append(status.value)
        for key, value in (attributes or {}).items():
            where.append(
                "EXISTS (SELECT 1 FROM device_attributes a "
                "WHERE a.device_id = d.id AND a.key = ? AND a.value = ?)"
            )
            args.extend((key, value))
        if address is not None:
            where.append(
                "EXISTS (SELECT 1 FROM device_addresses n "
                "WHERE n.device_id = d.id AND n.address = ?)"
            )
            args.append(address)
        clause = ("WHERE " + " AND ".join(where)) if where else ""
        columns = ", ".join(f"d.{c.strip()}" for c in _COLUMNS.split(","))
        rows = await self._tx.fetch(
            f"SELECT {columns} FROM devices d {clause} ORDER BY d.id LIMIT ?", *args, limit
        )
        return await self._hydrate(rows)

    async def count_by_status(self) -> dict[str, int]:
        rows = await self._tx.fetch("SELECT status, COUNT(*) AS n FROM devices GROUP BY status")
        return {r["status"]: int(r["n"]) for r in rows}

    async def count_in_group(self, group: str) -> int:
        row = await self._tx.fetchrow(
            "SELECT COUNT(*) AS n FROM devices WHERE group_name = ?", group
        )
        return int(row["n"]) if row else 0
