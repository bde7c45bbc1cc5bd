"""Sealed secrets: write, read back, and re-seal under a new master key."""

from __future__ import annotations

from dataclasses import dataclass

from fleetgate.clock import Clock
from fleetgate.records import NewAuditEntry
from fleetgate.sealing import Keyring, Secret, open_box, seal
from fleetgate.services.context import Caller
from fleetgate.store import Database, Tx
from fleetgate.store.audit import AuditRepo
from fleetgate.store.sealed import SealedSecretRepo

RESEAL_BATCH = 200


@dataclass(frozen=True)
class ResealReport:
    resealed: int
    key_id: str
    retired_key_ids: tuple[str, ...]


class Vault:
    def __init__(self, db: Database, keyring: Keyring, clock: Clock) -> None:
        self._db = db
        self.keyring = keyring
        self._clock = clock

    async def put(self, name: str, value: Secret) -> None:
        async with self._db.transaction() as tx:
            await self.put_in(tx, name, value)

    async def get(self, name: str) -> Secret | None:
        async with self._db.snapshot() as tx:
            return await self.get_in(tx, name)

    async def put_in(self, tx: Tx, name: str, value: Secret) -> None:
        """Seal ``value`` as part of the caller's transaction."""
        await SealedSecretRepo(tx).put(name, seal(self.keyring, name, value), self._clock.now())

    async def get_in(self, tx: Tx, name: str) -> Secret | None:
        box = await SealedSecretRepo(tx).get(name)
        return open_box(self.keyring, name, box) if box is not None else None

    async def delete(self, name: str) -> bool:
        async with self._db.transaction() as tx:
            return await SealedSecretRepo(tx).delete(name)

    async def key_usage(self) -> dict[str, int]:
        async with self._db.snapshot() as tx:
            return await SealedSecretRepo(tx).key_ids_in_use()

    async def reseal_all(self, caller: Caller) -> ResealReport:
        """Re-seal every secret under the active key, batch by batch (each batch atomic).

        A secret already under the active key is left alone, so an interrupted run can simply
        be started again.
        """
        active = self.keyring.active.key_id
        count = 0
        after: str | None = None
        while True:
            async with self._db.transaction() as tx:
                repo = SealedSecretRepo(tx)
                names = await repo.names(after=after, limit=RESEAL_BATCH)
                for name in names:
                    box = await repo.get(name)
                    if box is None or box.key_id == active:
                        continue
                    value = open_box(self.keyring, name, box)
                    await repo.put(name, seal(self.keyring, name, value), self._clock.now())
                    count += 1
            if len(names) < RESEAL_BATCH:
                break
            after = names[-1]
        usage = await self.key_usage()
        retired = tuple(k for k in self.keyring.key_ids if k != active and k not in usage)
        async with self._db.transaction() as tx:
            await AuditRepo(tx).append(
                NewAuditEntry(
                    actor=caller.principal.actor,
                    action="keys.rotate",
                    target_type="master_key",
                    target_id=active,
                    request_id=caller.request_id,
                    source=caller.source,
                    after={"resealed": count, "active_key_id": active},
                ),
                self._clock.now(),
            )
        return ResealReport(resealed=count, key_id=active, retired_key_ids=retired)
