"""Sealed secrets: ciphertext, nonce and the id of the master key that sealed them."""

from __future__ import annotations

from datetime import datetime

from fleetgate.clock import to_epoch_us
from fleetgate.sealing import SealedBox
from fleetgate.store.database import Tx


class SealedSecretRepo:
    def __init__(self, tx: Tx) -> None:
        self._tx = tx

    async def put(self, name: str, box: SealedBox, at: datetime) -> None:
        await self._tx.execute(
            "INSERT INTO sealed_secrets (name, key_id, nonce, ciphertext, updated_at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET key_id = excluded.key_id, "
            "nonce = excluded.nonce, ciphertext = excluded.ciphertext, "
            "updated_at = excluded.updated_at",
            name,
            box.key_id,
            box.nonce,
            box.ciphertext,
            to_epoch_us(at),
        )

    async def get(self, name: str) -> SealedBox | None:
        row = await self._tx.fetchrow(
            "SELECT key_id, nonce, ciphertext FROM sealed_secrets WHERE name = ?", name
        )
        if row is None:
            return None
        return SealedBox(
            key_id=row["key_id"], nonce=bytes(row["nonce"]), ciphertext=bytes(row["ciphertext"])
        )

    async def delete(self, name: str) -> bool:
        return await self._tx.execute("DELETE FROM sealed_secrets WHERE name = ?", name) == 1

    async def names(self, *, after: str | None = None, limit: int = 500) -> list[str]:
        rows = await self._tx.fetch(
            "SELECT name FROM sealed_secrets WHERE name > ? ORDER BY name LIMIT ?",
            after or "",
            limit,
        )
        return [r["name"] for r in rows]

    async def key_ids_in_use(self) -> dict[str, int]:
        rows = await self._tx.fetch(
            "SELECT key_id, COUNT(*) AS n FROM sealed_secrets GROUP BY key_id"
        )
        return {r["key_id"]: int(r["n"]) for r in rows}
