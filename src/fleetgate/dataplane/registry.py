"""The data path's read-only, cached view of the registry: devices, groups, credentials and
the certificates fleetgate issued.

A connection must not cost a database round trip for what rarely changes. Entries live until
the change feed (the audit log, followed by every process) says something they depend on
changed: a device change drops that device's entries, any credential or certificate change
drops every resolved credential. A lookup racing with an invalidation is not cached (a
generation counter), so a stale answer cannot outlive the change that made it stale.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fleetgate.clock import Clock
from fleetgate.errors import InvalidRequest
from fleetgate.logs import get_logger
from fleetgate.pki.records import Credential, CredentialKind, IssuedCertificate
from fleetgate.records import Device, Group
from fleetgate.sealing import Secret
from fleetgate.services.bundle import Services
from fleetgate.store.certificates import CertificateRepo
from fleetgate.store.changes import Change
from fleetgate.store.credentials import CredentialRepo, secret_name
from fleetgate.store.database import Tx
from fleetgate.store.devices import DeviceRepo
from fleetgate.store.groups import GroupRepo
from fleetgate.templates import Template

log = get_logger("fleetgate.dataplane")
MAX_ENTRIES = 200_000


class CredentialUnusable(Exception):
    """A credential exists but must not be presented (``cause``: credential_revoked, …)."""

    def __init__(self, cause: str, detail: str) -> None:
        super().__init__(detail)
        self.cause = cause


@dataclass(frozen=True)
class Material:
    """A credential with its secret part, ready for the data path."""

    credential: Credential
    secret: Secret | None
    revoked: bool

    def check_usable(self, clock: Clock, kind: CredentialKind) -> None:
        cred = self.credential
        if cred.kind is not kind:
            raise CredentialUnusable(
                "credential_kind", f"credential {cred.id} is {cred.kind.value}, not {kind.value}"
            )
        if self.revoked:
            raise CredentialUnusable(
                "credential_revoked", f"credential {cred.id}: its certificate is revoked"
            )
        if cred.not_after is not None and cred.not_after <= clock.now():
            raise CredentialUnusable(
                "credential_expired", f"credential {cred.id} expired at {cred.not_after}"
            )
        if self.secret is None:
            raise CredentialUnusable("credential_incomplete", f"credential {cred.id} has no secret")


class _Cache[K, V]:
    def __init__(self) -> None:
        self.entries: dict[K, V] = {}
        self.generation = 0

    def clear(self) -> None:
        self.entries.clear()
        self.generation += 1

    async def get(self, key: K, load: Callable[[], Awaitable[V]]) -> V:
        try:
            return self.entries[key]
        except KeyError:
            pass
        generation = self.generation
        value = await load()
        if generation == self.generation:
            if len(self.entries) >= MAX_ENTRIES:
                self.entries.clear()  # bounded: a cold cache is slower, never wrong
            self.entries[key] = value
        return value


class RegistryView:
    def __init__(self, services: Services, clock: Clock) -> None:
        self._services = services
        self._clock = clock
        self._by_address: _Cache[str, Device | None] = _Cache()
        self._by_field: _Cache[tuple[str, str], Device | None] = _Cache()
        self._groups: _Cache[str, Group | None] = _Cache()
        self._credentials: _Cache[tuple[str, str, str | None], Material | None] = _Cache()
        self._certificates: _Cache[str, IssuedCertificate | None] = _Cache()

    # -- lookups --------------------------------------------------------------------------------

    async def device_by_address(self, address: str) -> Device | None:
        return await self._by_address.get(
            address, lambda: self._services.devices.find_by_address(address)
        )

    async def device_by_field(self, field: str, value: str) -> Device | None:
        """The device a login names: ``device_id`` or a unique attribute such as ``imsi``."""

        async def find(tx: Tx) -> Device | None:
            repo = DeviceRepo(tx)
            owner = value if field == "device_id" else await repo.attribute_owner(field, value)
            return await repo.get(owner) if owner is not None else None

        return await self._by_field.get((field, value), lambda: self._services.db.read(find))

    async def certificate(self, serial: str) -> IssuedCertificate | None:
        """A certificate fleetgate issued (by serial, lowercase hex); None for any other."""

        def load() -> Awaitable[IssuedCertificate | None]:
            return self._services.db.read(lambda tx: CertificateRepo(tx).get(serial))

        return await self._certificates.get(serial, load)

    async def group(self, name: str) -> Group | None:
        def load() -> Awaitable[Group | None]:
            return self._services.db.read(lambda tx: GroupRepo(tx).get(name))

        return await self._groups.get(name, load)

    async def credential(
        self, device: Device, template: str | None, default: str | None
    ) -> Material | None:
        """What ``template`` names for ``device`` (a device-bound credential only for its own
        device), else ``default``; None when neither exists."""
        try:
            wanted = (
                Template(template).expand(device.id, device.group, device.attributes)
                if template
                else None
            )
        except InvalidRequest as exc:
            raise CredentialUnusable("credential_template", exc.detail) from None

        async def find(tx: Tx) -> Material | None:
            repo = CredentialRepo(tx)
            found = None
            for name in (wanted, default):
                if name is None:
                    continue
                found = await repo.get(name)
                if found is not None and found.device_id not in (None, device.id):
                    found = None  # another device's credential is never handed out
                if found is not None:
                    break
            if found is None:
                return None
            revoked = False
            if found.certificate_serial is not None:
                issued = await CertificateRepo(tx).get(found.certificate_serial)
                revoked = issued is not None and issued.revoked
            secret = (
                await self._services.vault.get_in(tx, secret_name(found.id))
                if found.has_secret
                else None
            )
            return Material(found, secret, revoked)

        return await self._credentials.get(
            (device.id, wanted or "", default), lambda: self._services.db.read(find)
        )

    # -- invalidation ---------------------------------------------------------------------------

    def on_change(self, change: Change) -> None:
        kind = change.target_type
        if kind == "device":
            # An address or attribute may have moved to or from this device: drop the indexes.
            self._by_address.clear()
            self._by_field.clear()
            self._credentials.clear()
        elif kind == "group":
            self._groups.clear()
        elif kind in ("credential", "certificate", "ca"):
            self._credentials.clear()
            self._certificates.clear()
        else:
            return
        log.info("registry.invalidated", target_type=kind, target_id=change.target_id)

    def stats(self) -> dict[str, Any]:
        return {
            "devices": len(self._by_address.entries) + len(self._by_field.entries),
            "groups": len(self._groups.entries),
            "credentials": len(self._credentials.entries),
            "certificates": len(self._certificates.entries),
        }
