"""Issuing certificates into the credential store: for devices, and for the gateway itself.

A device certificate comes from the device's CSR (fleetgate never sees the key) or from a key
fleetgate generates and keeps sealed in an x509 credential, which it then renews by itself. The
gateway's own server and upstream-client certificates are always the latter.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from cryptography import x509

from fleetgate.auth.authz import require_unscoped_admin, require_write
from fleetgate.clock import Clock
from fleetgate.errors import Conflict, InvalidRequest, NotFound
from fleetgate.pki.authority import Subject
from fleetgate.pki.csr import parse_csr
from fleetgate.pki.keys import KeyAlgorithm, PrivateKey, generate_key, private_key_pem
from fleetgate.pki.name_policy import allowed_names, subject_for
from fleetgate.pki.profiles import Profile
from fleetgate.pki.records import Credential, CredentialKind, IssuedCertificate
from fleetgate.records import NewAuditEntry
from fleetgate.sealing import Secret
from fleetgate.services.authority import AuthorityService, Issuance, pem
from fleetgate.services.context import Caller
from fleetgate.services.credential_records import (
    audit_credential,
    check_credential_id,
    device_credential_id,
)
from fleetgate.services.vault import Vault
from fleetgate.store import Database, Tx
from fleetgate.store.audit import AuditRepo
from fleetgate.store.credentials import CredentialRepo, secret_name
from fleetgate.store.devices import DeviceRepo

_DNS_NAME = re.compile(
    r"^(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$"
)
GATEWAY_PROFILES = (Profile.GATEWAY_SERVER, Profile.UPSTREAM_CLIENT)


@dataclass(frozen=True)
class IssuedBundle:
    certificate: IssuedCertificate
    certificate_pem: str
    chain_pem: str
    credential_id: str | None


class IssuingService:
    def __init__(
        self, db: Database, vault: Vault, authority: AuthorityService, clock: Clock
    ) -> None:
        self._db = db
        self._vault = vault
        self._authority = authority
        self._clock = clock

    async def issue_for_device(
        self,
        caller: Caller,
        device_id: str,
        *,
        csr: bytes | None,
        generate: KeyAlgorithm | None,
        lifetime: timedelta | None,
        credential_id: str | None = None,
    ) -> IssuedBundle:
        """A device client certificate, from the device's CSR or a key fleetgate makes and keeps."""
        if (csr is None) == (generate is None):
            raise InvalidRequest("give csr or generate_key, not both", field="csr")
        key = await asyncio.to_thread(generate_key, generate) if generate else None
        parsed = parse_csr(csr) if csr is not None else None
        config = self._authority.config
        life = lifetime or timedelta(days=config.device_lifetime_days)
        async with self._db.transaction() as tx:
            device = await DeviceRepo(tx).get(device_id)
            if device is None:
                raise NotFound(f"device {device_id} does not exist", field="device_id")
            require_write(caller.principal, device.group)
            allowed = allowed_names(
                device, config.device_dns_templates, config.device_uri_templates
            )
            subject = subject_for(device, allowed, parsed.names if parsed else None)
            if parsed is not None:
                public_key = parsed.public_key
            else:
                assert key is not None
                public_key = key.public_key()
            chosen_id = None
            if key is not None:
                chosen_id = check_credential_id(credential_id or device_credential_id(device.id))
            record, chain = await self._authority.issue_in(
                tx,
                Issuance(
                    profile=Profile.DEVICE_CLIENT,
                    subject=subject,
                    public_key=public_key,
                    lifetime=life,
                    device_id=device.id,
                    credential_id=chosen_id,
                ),
            )
            if key is not None and chosen_id is not None:
                await self._store_issued(tx, caller, chosen_id, device.id, record, chain, key)
            await self._audit_issue(
                tx,
                caller,
                record,
                group=device.group,
                extra={
                    "device_id": device.id,
                    "key": "generated" if key else "csr",
                    "credential_id": chosen_id,
                },
            )
        certificate = x509.load_der_x509_certificate(record.der)
        return IssuedBundle(record, pem(certificate), chain, chosen_id)

    async def _store_issued(
        self,
        tx: Tx,
        caller: Caller,
        credential_id: str,
        device_id: str | None,
        record: IssuedCertificate,
        chain: str,
        key: PrivateKey,
    ) -> None:
        now = self._clock.now()
        existing, fresh = await keep_in_credential(
            tx, self._vault, credential_id, device_id, record, chain, key, now
        )
        await audit_credential(
            tx,
            caller,
            "credential.create" if existing is None else "credential.update",
            existing,
            fresh,
            now,
        )

    async def _audit_issue(
        self,
        tx: Tx,
        caller: Caller,
        record: IssuedCertificate,
        *,
        group: str | None = None,
        extra: dict[str, Any],
    ) -> None:
        await AuditRepo(tx).append(
            NewAuditEntry(
                actor=caller.principal.actor,
                action="certificate.issue",
                target_type="certificate",
                target_id=record.serial,
                group=group,
                request_id=caller.request_id,
                source=caller.source,
                after={
                    "profile": record.profile.value,
                    "subject": record.subject,
                    "sans": list(record.sans),
                    "not_after": record.not_after.isoformat(),
                    **extra,
                },
            ),
            self._clock.now(),
        )

    async def issue_for_gateway(
        self,
        caller: Caller,
        credential_id: str,
        *,
        profile: Profile,
        common_name: str,
        dns_names: tuple[str, ...],
        ip_addresses: tuple[str, ...],
        algorithm: KeyAlgorithm,
        lifetime: timedelta | None,
    ) -> IssuedBundle:
        """A server or upstream-client certificate whose key fleetgate makes, keeps and renews."""
        require_unscoped_admin(caller.principal, "issuing the gateway's own certificates")
        check_credential_id(credential_id)
        if profile not in GATEWAY_PROFILES:
            raise InvalidRequest("profile is gateway_server or upstream_client", field="profile")
        if not common_name or len(common_name) > 64:
            raise InvalidRequest("common_name is 1-64 characters", field="common_name")
        for name in dns_names:
            if len(name) > 253 or not _DNS_NAME.fullmatch(name):
                raise InvalidRequest(f"{name[:80]!r} is not a DNS name", field="dns_names")
        for address in ip_addresses:
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise InvalidRequest(
                    f"{address[:80]!r} is not an IP address", field="ip_addresses"
                ) from None
        if profile is Profile.GATEWAY_SERVER and not (dns_names or ip_addresses):
            raise InvalidRequest(
                "a server certificate needs dns_names or ip_addresses", field="dns_names"
            )
        config = self._authority.config
        days = (
            config.server_lifetime_days
            if profile is Profile.GATEWAY_SERVER
            else (config.device_lifetime_days)
        )
        key = await asyncio.to_thread(generate_key, algorithm)
        async with self._db.transaction() as tx:
            record, chain = await self._authority.issue_in(
                tx,
                Issuance(
                    profile=profile,
                    subject=Subject(common_name, dns_names=dns_names, ip_addresses=ip_addresses),
                    public_key=key.public_key(),
                    lifetime=lifetime or timedelta(days=days),
                    credential_id=credential_id,
                ),
            )
            await self._store_issued(tx, caller, credential_id, None, record, chain, key)
            await self._audit_issue(tx, caller, record, extra={"credential_id": credential_id})
        certificate = x509.load_der_x509_certificate(record.der)
        return IssuedBundle(record, pem(certificate), chain, credential_id)


async def keep_in_credential(
    tx: Tx,
    vault: Vault,
    credential_id: str,
    device_id: str | None,
    record: IssuedCertificate,
    chain: str | None,
    key: PrivateKey,
    now: datetime,
    *,
    description: str | None = None,
    expected_revision: int | None = None,
) -> tuple[Credential | None, Credential]:
    """Point an x509 credential at a new certificate and seal its key; (before, after).

    With ``expected_revision``, refuse if the credential changed since the caller read it."""
    repo = CredentialRepo(tx)
    existing = await repo.get(credential_id)
    if expected_revision is not None and (
        existing is None or existing.revision != expected_revision
    ):
        raise Conflict(f"credential {credential_id} changed meanwhile; try again")
    if existing is not None and existing.device_id not in (None, device_id):
        raise Conflict(f"credential {credential_id} belongs to device {existing.device_id}")
    fresh = Credential(
        id=credential_id,
        kind=CredentialKind.X509,
        description=(
            existing.description
            if existing
            else description or f"issued for {device_id or record.subject}"
        ),
        device_id=device_id,
        public={},
        certificate_serial=record.serial,
        certificate=record.der,
        chain=chain,
        not_after=record.not_after,
        has_secret=True,
        exported_at=None,
        created_at=existing.created_at if existing else now,
        updated_at=now,
        revision=existing.revision + 1 if existing else 1,
    )
    if existing is None:
        await repo.insert(fresh)
    elif not await repo.replace(fresh, expected_revision=existing.revision):
        raise Conflict(f"credential {credential_id} changed meanwhile; try again")
    await vault.put_in(tx, secret_name(credential_id), Secret(private_key_pem(key)))
    return existing, fresh
