"""Every service, built once over one store, keyring and clock."""

from __future__ import annotations

from dataclasses import dataclass

from fleetgate.clock import Clock
from fleetgate.config.schema import PkiConfig, SessionsConfig
from fleetgate.sealing import Keyring
from fleetgate.services.audit import AuditService
from fleetgate.services.authority import AuthorityService
from fleetgate.services.credentials import CredentialService
from fleetgate.services.devices import DeviceService
from fleetgate.services.groups import GroupService
from fleetgate.services.issuing import IssuingService
from fleetgate.services.lifecycle import LifecycleService
from fleetgate.services.replacement import ReplacementService
from fleetgate.services.revocation import RevocationService
from fleetgate.services.sessions import SessionService
from fleetgate.services.tokens import TokenService
from fleetgate.services.vault import Vault
from fleetgate.store import Database

DEFAULT_PUBLIC_URL = "http://127.0.0.1:8080"


@dataclass(frozen=True)
class Services:
    db: Database
    devices: DeviceService
    groups: GroupService
    tokens: TokenService
    audit: AuditService
    vault: Vault
    authority: AuthorityService
    revocation: RevocationService
    credentials: CredentialService
    issuing: IssuingService
    lifecycle: LifecycleService
    replacement: ReplacementService
    sessions: SessionService

    @classmethod
    def build(
        cls,
        db: Database,
        keyring: Keyring,
        clock: Clock,
        *,
        pki: PkiConfig | None = None,
        public_url: str = DEFAULT_PUBLIC_URL,
        sessions: SessionsConfig | None = None,
    ) -> Services:
        vault = Vault(db, keyring, clock)
        authority = AuthorityService(db, vault, clock, pki or PkiConfig(), public_url)
        revocation = RevocationService(db, vault, authority, clock)
        credentials = CredentialService(db, vault, authority, clock)
        return cls(
            db=db,
            devices=DeviceService(db, clock),
            groups=GroupService(db, clock),
            tokens=TokenService(db, clock),
            audit=AuditService(db),
            vault=vault,
            authority=authority,
            revocation=revocation,
            credentials=credentials,
            issuing=IssuingService(db, vault, authority, clock),
            lifecycle=LifecycleService(db, vault, authority, revocation, clock),
            replacement=ReplacementService(db, vault, authority, revocation, clock),
            sessions=SessionService(db, clock, sessions or SessionsConfig(), authority, vault),
        )
