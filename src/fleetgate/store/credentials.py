"""Credentials: their public parts here, their secret parts sealed under ``credential:<id>``."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from fleetgate.clock import from_epoch_us, to_epoch_us
from fleetgate.pki.records import Credential, CredentialKind
from fleetgate.store.database import Row, Tx

_COLUMNS = (
    "id, kind, description, device_id, public, certificate_serial, certificate, chain, "
    "not_after, has_secret, exported_at, created_at, updated_at, revision"
)


def secret_name(credential_id: str) -> str:
    return f"credential:{credential_id}"


def _credential(row: Row) -> Credential:
    return Credential(
        id=row["id"],
        kind=CredentialKind(row["kind"]),
        description=row["description"],
        device_id=row["device_id"],
        public=json.loads(row["public"]),
        certificate_serial=row["certificate_serial"],
        certificate=bytes(row["certificate"]) if row["certificate"] is not None else None,
        chain=row["chain"],
        not_after=from_epoch_us(row["not_after"]) if row["not_after"] is not None else None,
        has_secret=bool(row["has_secret"]),
        exported_at=from_epoch_us(row["exported_at"]) if row["exported_at"] is not None else None,
        created_at=from_epoch_us(row["created_at"]),
        updated_at=from_epoch_us(row["updated_at"]),
        revision=int(row["revision"]),
    )


def _values(c: Credential) -> tuple[Any, ...]:
    return (
        c.id,
        c.kind.value,
        c.description,
        c.device_id,
        json.dumps(dict(c.public), sort_keys=True),
        c.certificate_serial,
        c.certificate,
        c.chain,
        to_epoch_us(c.not_after) if c.not_after else None,
        1 if c.has_secret else 0,
        to_epoch_us(c.exported_at) if c.exported_at else None,
        to_epoch_us(c.created_at),
        to_epoch_us(c.updated_at),
        c.revision,
    )


class CredentialRepo:
    def __init__(self, tx: Tx) -> None:
        self._tx = tx

    async def insert(self, credential: Credential) -> None:
        await self._tx.execute(
            f"INSERT INTO credentials ({_COLUMNS}) VALUES ({', '.join('?' * 14)})",
            *_values(credential),
        )

    async def replace(self, credential: Credential, *, expected_revision: int) -> bool:
        values = _values(credential)
        changed = await self._tx.execute(
            "UPDATE credentials SET kind = ?, description = ?, device_id = ?, public = ?, "
            "certificate_serial = ?, certificate = ?, chain = ?, not_after = ?, has_secret = ?, "
            "exported_at = ?, created_at = ?, updated_at = ?, revision = ? "
            "WHERE id = ? AND revision = ?",
            *values[1:],
            credential.id,
            expected_revision,
        )
        return changed == 1

    async def get(self, credential_id: str) -> Credential | None:
        row = await self._tx.fetchrow(
            f"SELECT {_COLUMNS} FROM credentials WHERE id = ?", credential_id
        )
        return _credential(row) if row else None

    async def delete(self, credential_id: str) -> bool:
        return await self._tx.execute("DELETE FROM credentials WHERE id = ?", credential_id) == 1

    async def list(
        self,
        *,
        limit: int,
        after: str | None = None,
        device_id: str | None = None,
        kind: CredentialKind | None = None,
        expiring_before: datetime | None = None,
        imported_with_end: bool = False,
    ) -> list[Credential]:
        """``imported_with_end``: only those holding a certificate fleetgate did not issue
        (no serial of its own) and an end date."""
        where: list[str] = []
        args: list[Any] = []
        if imported_with_end:
            where.append("certificate_serial IS NULL AND not_after IS NOT NULL")
        if after is not None:
            where.append("id > ?")
            args.append(after)
        if device_id is not None:
            where.append("device_id = ?")
            args.append(device_id)
        if kind is not None:
            where.append("kind = ?")
            args.append(kind.value)
        if expiring_before is not None:
            where.append("not_after < ?")
            args.append(to_epoch_us(expiring_before))
        clause = ("WHERE " + " AND ".join(where)) if where else ""
        rows = await self._tx.fetch(
            f"SELECT {_COLUMNS} FROM credentials {clause} ORDER BY id LIMIT ?", *args, limit
        )
        return [_credential(r) for r in rows]
