"""The current CRL of each issuer; its number only ever grows."""

from __future__ import annotations

from fleetgate.clock import from_epoch_us, to_epoch_us
from fleetgate.pki.records import CrlRecord
from fleetgate.store.database import Tx


class CrlRepo:
    def __init__(self, tx: Tx) -> None:
        self._tx = tx

    async def get(self, issuer_id: str) -> CrlRecord | None:
        row = await self._tx.fetchrow(
            "SELECT issuer_id, number, this_update, next_update, der FROM crls WHERE issuer_id = ?",
            issuer_id,
        )
        if row is None:
            return None
        return CrlRecord(
            issuer_id=row["issuer_id"],
            number=int(row["number"]),
            this_update=from_epoch_us(row["this_update"]),
            next_update=from_epoch_us(row["next_update"]),
            der=bytes(row["der"]),
        )

    async def put(self, crl: CrlRecord, *, previous_number: int | None) -> bool:
        """Store ``crl`` if the stored one is still ``previous_number`` (None: none yet)."""
        if previous_number is None:
            changed = await self._tx.execute(
                "INSERT INTO crls (issuer_id, number, this_update, next_update, der) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (issuer_id) DO NOTHING",
                crl.issuer_id,
                crl.number,
                to_epoch_us(crl.this_update),
                to_epoch_us(crl.next_update),
                crl.der,
            )
        else:
            changed = await self._tx.execute(
                "UPDATE crls SET number = ?, this_update = ?, next_update = ?, der = ? "
                "WHERE issuer_id = ? AND number = ?",
                crl.number,
                to_epoch_us(crl.this_update),
                to_epoch_us(crl.next_update),
                crl.der,
                crl.issuer_id,
                previous_number,
            )
        return changed == 1

    async def all(self) -> list[CrlRecord]:
        rows = await self._tx.fetch("SELECT issuer_id FROM crls ORDER BY issuer_id")
        found = [await self.get(r["issuer_id"]) for r in rows]
        return [c for c in found if c is not None]
