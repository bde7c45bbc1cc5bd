"""Device replacement: the new device takes over the old one's identity and rights.

Group, attributes, routes (and, unless new ones are given, addresses) move to the new device;
every credential bound to the old device is rebound; the old device's certificates are revoked as
``superseded``; where fleetgate holds a credential's key, a fresh key and certificate are issued
for the new device. The old device stays registered, disabled and empty, for the record.
All of it commits in one transaction, each step audited.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from cryptography import x509

from fleetgate.auth.authz import require_write
from fleetgate.clock import Clock
from fleetgate.errors import Conflict, InvalidRequest, NotFound
from fleetgate.pki.authority import BACKDATE
from fleetgate.pki.crl import RevocationReason
from fleetgate.pki.keys import PrivateKey, algorithm_of, generate_key, private_key_pem
from fleetgate.pki.name_policy import allowed_names, subject_for
from fleetgate.pki.profiles import Profile
from fleetgate.pki.records import CredentialKind
from fleetgate.records import (
    Device,
    DeviceStatus,
    NewAuditEntry,
    check_attributes,
    check_device_id,
    normalize_addresses,
)
from fleetgate.sealing import Secret
from fleetgate.services.authority import AuthorityService, Issuance
from fleetgate.services.context import Caller
from fleetgate.services.devices import device_snapshot
from fleetgate.services.revocation import RevocationService
from fleetgate.services.vault import Vault
from fleetgate.store import Database, IntegrityViolation, Tx
from fleetgate.store.audit import AuditRepo
from fleetgate.store.certificates import CertificateQuery, CertificateRepo
from fleetgate.store.credentials import CredentialRepo, secret_name
from fleetgate.store.devices import DeviceRepo


@dataclass(frozen=True)
class Replacement:
    old: Device
    new: Device
    revoked: tuple[str, ...]
    reissued: tuple[tuple[str, str], ...]  # (credential id, new serial)
    rebound: tuple[str, ...]  # credential ids


class ReplacementService:
    def __init__(
        self,
        db: Database,
        vault: Vault,
        authority: AuthorityService,
        revocation: RevocationService,
        clock: Clock,
    ) -> None:
        self._db = db
        self._vault = vault
        self._authority = authority
        self._revocation = revocation
        self._clock = clock

    async def replace(
        self,
        caller: Caller,
        old_id: str,
        new_id: str,
        *,
        name: str | None = None,
        addresses: tuple[str, ...] | None = None,
        attributes: dict[str, str] | None = None,
    ) -> Replacement:
        check_device_id(new_id)
        if new_id == old_id:
            raise InvalidRequest("a device cannot replace itself", field="with")
        if attributes:
            check_attributes(attributes)
        # Keys are made before the transaction (RSA can take a while).
        async with self._db.snapshot() as tx:
            held = [
                c
                for c in await CredentialRepo(tx).list(limit=1000, device_id=old_id)
                if c.kind is CredentialKind.X509 and c.has_secret and c.certificate_serial
            ]
        keys: dict[str, PrivateKey] = {}
        for credential in held:
            assert credential.certificate is not None
            algorithm = algorithm_of(
                x509.load_der_x509_certificate(credential.certificate).public_key()
            )
            keys[credential.id] = await asyncio.to_thread(generate_key, algorithm)
        try:
            return await self._replace(caller, old_id, new_id, name, addresses, attributes, keys)
        except IntegrityViolation as exc:
            raise Conflict(f"replacing {old_id} with {new_id} conflicts: {exc}") from None

    async def _replace(
        self,
        caller: Caller,
        old_id: str,
        new_id: str,
        name: str | None,
        addresses: tuple[str, ...] | None,
        attributes: dict[str, str] | None,
        keys: dict[str, PrivateKey],
    ) -> Replacement:
        now = self._clock.now()
        async with self._db.transaction() as tx:
            old, emptied, new, before_new = await self._move_identity(
                tx, caller, old_id, new_id, name, addresses, attributes
            )
            step = _Steps(tx, caller, old.group, now)
            await AuditRepo(tx).append(
                NewAuditEntry(
                    actor=caller.principal.actor,
                    action="device.replace",
                    target_type="device",
                    target_id=old.id,
                    group=old.group,
                    request_id=caller.request_id,
                    source=caller.source,
                    before=device_snapshot(old),
                    after={
                        "replaced_by": new.id,
                        "old": device_snapshot(emptied),
                        "new_before": before_new,
                        "new": device_snapshot(new),
                    },
                ),
                now,
            )
            rebound = await self._rebind(step, old.id, new.id)
            revoked, issuers = await self._revoke(step, old.id, new.id)
            reissued = await self._reissue(step, new, keys)
            for issuer_id in sorted(issuers):
                await self._revocation.regenerate_crl(tx, issuer_id)
        return Replacement(
            old=emptied,
            new=new,
            revoked=tuple(revoked),
            reissued=tuple(reissued),
            rebound=tuple(rebound),
        )

    async def _move_identity(
        self,
        tx: Tx,
        caller: Caller,
        old_id: str,
        new_id: str,
        name: str | None,
        addresses: tuple[str, ...] | None,
        attributes: dict[str, str] | None,
    ) -> tuple[Device, Device, Device, dict[str, Any] | None]:
        now = self._clock.now()
        devices = DeviceRepo(tx)
        old = await devices.get(old_id)
        if old is None:
            raise NotFound(f"device {old_id} does not exist")
        require_write(caller.principal, old.group)
        existing = await devices.get(new_id)
        if existing is not None:
            require_write(caller.principal, existing.group)
        moved = normalize_addresses(addresses) if addresses is not None else old.addresses
        emptied = replace(
            old,
            status=DeviceStatus.DISABLED,
            attributes={},
            addresses=(),
            routes={},
            updated_at=now,
            revision=old.revision + 1,
        )
        # The old device lets go first, so unique addresses and IMSIs can move.
        if not await devices.replace(emptied, expected_revision=old.revision):
            raise Conflict(f"device {old_id} changed meanwhile; try again")
        merged = {**old.attributes, **(attributes or {})}
        if existing is None:
            new = Device(
                id=new_id,
                name=name or new_id,
                group=old.group,
                status=DeviceStatus.ENABLED,
                attributes=dict(sorted(merged.items())),
                addresses=moved,
                created_at=now,
                updated_at=now,
                revision=1,
                routes=dict(old.routes),
            )
            await devices.insert(new)
            return old, emptied, new, None
        new = replace(
            existing,
            name=name or existing.name,
            group=old.group,
            status=DeviceStatus.ENABLED,
            attributes=dict(sorted({**existing.attributes, **merged}.items())),
            addresses=tuple(sorted(set(existing.addresses) | set(moved))),
            routes=dict(sorted({**existing.routes, **old.routes}.items())),
            updated_at=now,
            revision=existing.revision + 1,
        )
        if not await devices.replace(new, expected_revision=existing.revision):
            raise Conflict(f"device {new_id} changed meanwhile; try again")
        return old, emptied, new, device_snapshot(existing)

    async def _rebind(self, step: _Steps, old_id: str, new_id: str) -> list[str]:
        """Credentials follow the device."""
        credentials = CredentialRepo(step.tx)
        rebound: list[str] = []
        after_id: str | None = None
        while True:
            batch = await credentials.list(limit=500, after=after_id, device_id=old_id)
            for credential in batch:
                await credentials.replace(
                    replace(
                        credential,
                        device_id=new_id,
                        updated_at=step.now,
                        revision=credential.revision + 1,
                    ),
                    expected_revision=credential.revision,
                )
                rebound.append(credential.id)
                await step.record(
                    "credential.rebind",
                    "credential",
                    credential.id,
                    {"from_device": old_id, "to_device": new_id},
                )
            if len(batch) < 500:
                return rebound
            after_id = batch[-1].id

    async def _revoke(self, step: _Steps, old_id: str, new_id: str) -> tuple[list[str], set[str]]:
        """The old device's certificates stop being valid."""
        certificates = CertificateRepo(step.tx)
        revoked: list[str] = []
        issuers: set[str] = set()
        for cert in await certificates.list(
            CertificateQuery(device_id=old_id, revoked=False, valid_at=step.now), limit=10_000
        ):
            await certificates.revoke(cert.serial, step.now, RevocationReason.SUPERSEDED)
            revoked.append(cert.serial)
            issuers.add(cert.issuer_id)
            await step.record(
                "certificate.revoke",
                "certificate",
                cert.serial,
                {
                    "reason": RevocationReason.SUPERSEDED.value,
                    "device_id": old_id,
                    "replaced_by": new_id,
                },
            )
        return revoked, issuers

    async def _reissue(
        self, step: _Steps, new: Device, keys: dict[str, PrivateKey]
    ) -> list[tuple[str, str]]:
        """Where fleetgate holds the key, the new device gets a fresh key and certificate."""
        config = self._authority.config
        names = allowed_names(new, config.device_dns_templates, config.device_uri_templates)
        credentials = CredentialRepo(step.tx)
        reissued: list[tuple[str, str]] = []
        for credential_id, key in keys.items():
            credential = await credentials.get(credential_id)
            if credential is None or credential.certificate is None:
                continue
            previous = x509.load_der_x509_certificate(credential.certificate)
            # Validity starts BACKDATE early; the lifetime asked for was the rest.
            lifetime = previous.not_valid_after_utc - previous.not_valid_before_utc - BACKDATE
            issued, chain = await self._authority.issue_in(
                step.tx,
                Issuance(
                    profile=Profile.DEVICE_CLIENT,
                    subject=subject_for(new, names, None),
                    public_key=key.public_key(),
                    lifetime=max(lifetime, timedelta(days=1)),
                    device_id=new.id,
                    credential_id=credential_id,
                ),
            )
            await credentials.replace(
                replace(
                    credential,
                    certificate_serial=issued.serial,
                    certificate=issued.der,
                    chain=chain,
                    not_after=issued.not_after,
                    exported_at=None,
                    revision=credential.revision + 1,
                ),
                expected_revision=credential.revision,
            )
            await self._vault.put_in(
                step.tx, secret_name(credential_id), Secret(private_key_pem(key))
            )
            reissued.append((credential_id, issued.serial))
            await step.record(
                "certificate.issue",
                "certificate",
                issued.serial,
                {
                    "device_id": new.id,
                    "credential_id": credential_id,
                    "replaces": credential.certificate_serial,
                },
            )
        return reissued


@dataclass(frozen=True)
class _Steps:
    """One replacement's transaction and the audit context of its steps."""

    tx: Tx
    caller: Caller
    group: str
    now: datetime

    async def record(
        self, action: str, target_type: str, target_id: str, after: dict[str, Any]
    ) -> None:
        await AuditRepo(self.tx).append(
            NewAuditEntry(
                actor=self.caller.principal.actor,
                action=action,
                target_type=target_type,
                target_id=target_id,
                group=self.group,
                request_id=self.caller.request_id,
                source=self.caller.source,
                after=after,
            ),
            self.now,
        )
