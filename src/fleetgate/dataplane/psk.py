"""Every device's pre-shared key, by PSK identity, in memory.

OpenSSL asks for a key from inside the handshake, where nothing can wait for the database; so
a ``psk`` listener answers from this table, loaded at start and again whenever a credential
changes (the change feed). A PSK credential counts when it is bound to a device and its public
``identity`` is set; the key is its sealed secret.
"""

from __future__ import annotations

from dataclasses import dataclass

from fleetgate.logs import get_logger
from fleetgate.pki.records import CredentialKind
from fleetgate.services.bundle import Services
from fleetgate.store.credentials import CredentialRepo, secret_name

log = get_logger("fleetgate.dataplane")
PAGE = 1000


@dataclass(frozen=True)
class PskEntry:
    identity: str
    device_id: str
    credential_id: str
    key: bytes


class PskTable:
    def __init__(self, services: Services) -> None:
        self._services = services
        self._by_identity: dict[str, PskEntry] = {}

    def __len__(self) -> int:
        return len(self._by_identity)

    def get(self, identity: str | None) -> PskEntry | None:
        return self._by_identity.get(identity) if identity is not None else None

    def key(self, identity: str | None) -> bytes:
        """OpenSSL's callback: the key, or nothing (which refuses the identity)."""
        entry = self.get(identity)
        return entry.key if entry is not None else b""

    async def load(self) -> list[PskEntry]:
        """Read every device PSK again; the entries that went away or changed key."""
        found: dict[str, PskEntry] = {}
        services = self._services
        after: str | None = None
        while True:
            async with services.db.snapshot() as tx:
                page = await CredentialRepo(tx).list(
                    limit=PAGE, after=after, kind=CredentialKind.PSK
                )
                for credential in page:
                    identity = credential.public.get("identity")
                    if credential.device_id is None or not identity or not credential.has_secret:
                        continue
                    secret = await services.vault.get_in(tx, secret_name(credential.id))
                    if secret is None:
                        continue
                    if identity in found:
                        log.warning(
                            "psk.identity_taken",
                            identity=identity,
                            kept=found[identity].credential_id,
                            ignored=credential.id,
                        )
                        continue
                    found[identity] = PskEntry(
                        identity, credential.device_id, credential.id, secret.reveal()
                    )
            if len(page) < PAGE:
                break
            after = page[-1].id
        gone = [
            old
            for identity, old in self._by_identity.items()
            if (new := found.get(identity)) is None or new != old
        ]
        self._by_identity = found
        return gone
