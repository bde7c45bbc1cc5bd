"""Device registry use cases."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from fleetgate.auth.authz import in_scope, require_write
from fleetgate.clock import Clock
from fleetgate.errors import Conflict, NotFound, PreconditionFailed
from fleetgate.records import (
    DEFAULT_GROUP,
    UNIQUE_ATTRIBUTE_KEYS,
    Device,
    DeviceStatus,
    NewAuditEntry,
    Page,
    check_attributes,
    check_device_id,
    check_group_name,
    check_routes,
    normalize_address,
    normalize_addresses,
)
from fleetgate.services.context import Caller, check_limit, decode_cursor, encode_cursor
from fleetgate.store import Database, IntegrityViolation, Tx
from fleetgate.store.audit import AuditRepo
from fleetgate.store.certificates import CertificateQuery, CertificateRepo
from fleetgate.store.credentials import CredentialRepo
from fleetgate.store.devices import DeviceRepo
from fleetgate.store.groups import GroupRepo


@dataclass(frozen=True)
class NewDevice:
    id: str
    name: str | None = None
    group: str = DEFAULT_GROUP
    status: DeviceStatus = DeviceStatus.ENABLED
    attributes: Mapping[str, str] | None = None
    addresses: tuple[str, ...] = ()
    routes: Mapping[str, str] | None = None


@dataclass(frozen=True)
class DevicePatch:
    """Absent fields stay; ``attributes`` and ``routes`` merge (a ``None`` value removes a key)."""

    name: str | None = None
    group: str | None = None
    status: DeviceStatus | None = None
    attributes: Mapping[str, str | None] | None = None
    addresses: tuple[str, ...] | None = None
    routes: Mapping[str, str | None] | None = None


@dataclass(frozen=True)
class DeviceQuery:
    group: str | None = None
    status: DeviceStatus | None = None
    attributes: Mapping[str, str] | None = None
    address: str | None = None


def device_snapshot(device: Device) -> dict[str, Any]:
    """The audit log's picture of a device (devices hold no secrets)."""
    return {
        "id": device.id,
        "name": device.name,
        "group": device.group,
        "status": device.status.value,
        "attributes": dict(device.attributes),
        "addresses": list(device.addresses),
        "routes": dict(device.routes),
        "revision": device.revision,
    }


def _merged(current: Mapping[str, str], changes: Mapping[str, str | None] | None) -> dict[str, str]:
    """``current`` with ``changes`` applied, as in a JSON merge patch: ``None`` removes a key."""
    merged = dict(current)
    for key, value in (changes or {}).items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged


class DeviceService:
    def __init__(self, db: Database, clock: Clock) -> None:
        self._db = db
        self._clock = clock

    async def _check_unique(self, tx: Tx, device: Device) -> None:
        repo = DeviceRepo(tx)
        owners = await repo.address_owners(device.addresses)
        for address, owner in sorted(owners.items()):
            if owner != device.id:
                raise Conflict(
                    f"address {address} already identifies device {owner}", field="addresses"
                )
        for key in UNIQUE_ATTRIBUTE_KEYS:
            wanted = device.attributes.get(key)
            if wanted is None:
                continue
            holder = await repo.attribute_owner(key, wanted)
            if holder is not None and holder != device.id:
                raise Conflict(
                    f"{key} {wanted} already belongs to device {holder}", field=f"attributes.{key}"
                )

    async def _check_group(self, tx: Tx, group: str) -> None:
        if await GroupRepo(tx).get(group) is None:
            raise NotFound(f"group {group} does not exist; create it first", field="group")

    async def create(self, caller: Caller, spec: NewDevice) -> Device:
        check_device_id(spec.id)
        check_group_name(spec.group)
        require_write(caller.principal, spec.group)
        attributes = dict(spec.attributes or {})
        check_attributes(attributes)
        routes = dict(spec.routes or {})
        check_routes(routes)
        now = self._clock.now()
        device = Device(
            id=spec.id,
            name=spec.name if spec.name is not None else spec.id,
            group=spec.group,
            status=spec.status,
            attributes=dict(sorted(attributes.items())),
            addresses=normalize_addresses(spec.addresses),
            created_at=now,
            updated_at=now,
            revision=1,
            routes=dict(sorted(routes.items())),
        )
        try:
            async with self._db.transaction() as tx:
                repo = DeviceRepo(tx)
                if await repo.get(device.id) is not None:
                    raise Conflict(f"device {device.id} already exists", field="id")
                await self._check_group(tx, device.group)
                await self._check_unique(tx, device)
                await repo.insert(device)
                await AuditRepo(tx).append(
                    self._audit(caller, "device.create", device, None, device_snapshot(device)), now
                )
        except IntegrityViolation as exc:
            raise Conflict(f"device {device.id} conflicts with another device: {exc}") from None
        return device

    async def get(self, caller: Caller, device_id: str) -> Device:
        async with self._db.snapshot() as tx:
            device = await DeviceRepo(tx).get(device_id)
        if device is None or not in_scope(caller.principal, device.group):
            # Outside a token's groups a device is as absent as one never registered.
            raise NotFound(f"device {device_id} does not exist")
        return device

    async def find(self, device_id: str) -> Device | None:
        """A device by id for the data path (no caller: nothing is disclosed)."""
        return await self._db.read(lambda tx: DeviceRepo(tx).get(device_id))

    async def find_by_address(self, address: str) -> Device | None:
        """The data path's identity lookup (no caller: the network is the credential)."""
        key = normalize_address(address)
        return await self._db.read(lambda tx: DeviceRepo(tx).get_by_address(key))

    async def list(
        self, caller: Caller, query: DeviceQuery, *, limit: int, cursor: str | None
    ) -> Page[Device]:
        check_limit(limit)
        visible = caller.principal.visible_groups()
        address = normalize_address(query.address, "address") if query.address else None
        async with self._db.snapshot() as tx:
            items = await DeviceRepo(tx).list(
                limit=limit + 1,
                after=decode_cursor(cursor),
                within_groups=visible,
                group=query.group,
                status=query.status,
                attributes=query.attributes,
                address=address,
            )
        more = len(items) > limit
        items = items[:limit]
        return Page(items=items, next_cursor=encode_cursor(items[-1].id) if more else None)

    async def update(
        self, caller: Caller, device_id: str, patch: DevicePatch, *, if_revision: int | None = None
    ) -> Device:
        try:
            return await self._update(caller, device_id, patch, if_revision)
        except IntegrityViolation as exc:
            # Another writer claimed the same address or IMSI between our check and our write.
            raise Conflict(f"device {device_id} conflicts with another device: {exc}") from None

    async def _update(
        self, caller: Caller, device_id: str, patch: DevicePatch, if_revision: int | None
    ) -> Device:
        async with self._db.transaction() as tx:
            repo = DeviceRepo(tx)
            current = await repo.get(device_id)
            if current is None:
                raise NotFound(f"device {device_id} does not exist")
            require_write(caller.principal, current.group)
            if if_revision is not None and if_revision != current.revision:
                raise PreconditionFailed(
                    f"device {device_id} is at revision {current.revision}, not {if_revision}"
                )
            attributes = _merged(current.attributes, patch.attributes)
            check_attributes(attributes)
            routes = _merged(current.routes, patch.routes)
            check_routes(routes)
            if patch.group is not None:
                check_group_name(patch.group)
                require_write(caller.principal, patch.group)
                if patch.group != current.group:
                    await self._check_group(tx, patch.group)
            updated = replace(
                current,
                name=patch.name if patch.name is not None else current.name,
                group=patch.group if patch.group is not None else current.group,
                status=patch.status if patch.status is not None else current.status,
                attributes=dict(sorted(attributes.items())),
                addresses=(
                    normalize_addresses(patch.addresses)
                    if patch.addresses is not None
                    else current.addresses
                ),
                routes=dict(sorted(routes.items())),
                updated_at=self._clock.now(),
                revision=current.revision + 1,
            )
            if device_snapshot(updated) | {"revision": 0} == device_snapshot(current) | {
                "revision": 0
            }:
                return current
            await self._check_unique(tx, updated)
            if not await repo.replace(updated, expected_revision=current.revision):
                raise PreconditionFailed(f"device {device_id} changed while it was being updated")
            await AuditRepo(tx).append(
                self._audit(
                    caller,
                    "device.update",
                    updated,
                    device_snapshot(current),
                    device_snapshot(updated),
                ),
                updated.updated_at,
            )
        return updated

    async def delete(
        self, caller: Caller, device_id: str, *, if_revision: int | None = None
    ) -> None:
        async with self._db.transaction() as tx:
            repo = DeviceRepo(tx)
            current = await repo.get(device_id)
            if current is None:
                raise NotFound(f"device {device_id} does not exist")
            require_write(caller.principal, current.group)
            if if_revision is not None and if_revision != current.revision:
                raise PreconditionFailed(
                    f"device {device_id} is at revision {current.revision}, not {if_revision}"
                )
            await self._check_nothing_bound(tx, device_id)
            await repo.delete(device_id)
            await AuditRepo(tx).append(
                self._audit(caller, "device.delete", current, device_snapshot(current), None),
                self._clock.now(),
            )

    async def _check_nothing_bound(self, tx: Tx, device_id: str) -> None:
        """A device with live certificates or credentials is not silently forgotten."""
        now = self._clock.now()
        live = await CertificateRepo(tx).list(
            CertificateQuery(device_id=device_id, revoked=False, valid_at=now), limit=1
        )
        if live:
            raise Conflict(
                f"device {device_id} has valid certificates (e.g. {live[0].serial}); revoke them "
                "or replace the device first"
            )
        if await CredentialRepo(tx).list(limit=1, device_id=device_id):
            raise Conflict(
                f"device {device_id} still has credentials; delete them or replace the device"
            )

    async def counts(self) -> dict[str, int]:
        async with self._db.snapshot() as tx:
            return await DeviceRepo(tx).count_by_status()

    @staticmethod
    def _audit(
        caller: Caller,
        action: str,
        device: Device,
        before: dict[str, Any] | None,
        after: dict[str, Any] | None,
    ) -> NewAuditEntry:
        return NewAuditEntry(
            actor=caller.principal.actor,
            action=action,
            target_type="device",
            target_id=device.id,
            group=device.group,
            request_id=caller.request_id,
            source=caller.source,
            before=before,
            after=after,
        )
