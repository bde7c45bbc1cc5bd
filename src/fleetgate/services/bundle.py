"""Every service, built once over one store, keyring and clock."""

from __future__ import annotations

from dataclasses import dataclass

from fleetgate.clock import Clock
from fleetgate.sealing import Keyring
from fleetgate.services.audit import AuditService
from fleetgate.services.devices import DeviceService
from fleetgate.services.groups import GroupService
from fleetgate.services.tokens import TokenService
from fleetgate.services.vault import Vault
from fleetgate.store import Database


@dataclass(frozen=True)
class Services:
    db: Database
    devices: DeviceService
    groups: GroupService
    tokens: TokenService
    audit: AuditService
    vault: Vault

    @classmethod
    def build(cls, db: Database, keyring: Keyring, clock: Clock) -> Services:
        return cls(
            db=db,
            devices=DeviceService(db, clock),
            groups=GroupService(db, clock),
            tokens=TokenService(db, clock),
            audit=AuditService(db),
            vault=Vault(db, keyring, clock),
        )
