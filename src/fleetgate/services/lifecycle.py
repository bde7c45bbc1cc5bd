"""Keeping certificates alive: the expiry inventory, expiry alerts, and automatic renewal.

Every node runs :meth:`LifecycleService.maintain` periodically. Work is claimed in the store
(an alert row, ``renewed_by`` on the old certificate, the CRL number), so nodes never duplicate
it and nothing depends on which node does it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

import httpx
from cryptography import x509

from fleetgate.clock import Clock
from fleetgate.config.schema import AlertConfig
from fleetgate.logs import get_logger
from fleetgate.pki.authority import BACKDATE, Subject
from fleetgate.pki.keys import load_private_key_pem
from fleetgate.pki.profiles import Profile
from fleetgate.pki.records import CaRole, IssuedCertificate
from fleetgate.records import NewAuditEntry
from fleetgate.services.authority import AuthorityService, Issuance
from fleetgate.services.context import SYSTEM_CALLER
from fleetgate.services.revocation import RevocationService
from fleetgate.services.vault import Vault
from fleetgate.store import Database
from fleetgate.store.alerts import AlertRepo
from fleetgate.store.audit import AuditRepo
from fleetgate.store.authorities import AuthorityRepo
from fleetgate.store.certificates import CertificateQuery, CertificateRepo
from fleetgate.store.credentials import CredentialRepo, secret_name
from fleetgate.store.crls import CrlRepo

log = get_logger("fleetgate.pki")
PAGE = 500
# Sending an alert holds it this long; another node retries it only after.
ALERT_LEASE = timedelta(minutes=5)
# Certificates that ended this recently still get their at-expiry alert.
EXPIRED_ALERT_WINDOW = timedelta(days=7)
RENEWALS_PER_PASS = 200
MAX_BACKOFF = timedelta(hours=6)


class ItemKind(enum.StrEnum):
    CERTIFICATE = "certificate"  # issued here
    IMPORTED = "imported"  # an x509 credential brought in from elsewhere
    CA = "ca"
    CRL = "crl"


@dataclass(frozen=True)
class InventoryItem:
    kind: ItemKind
    id: str
    subject: str
    not_after: datetime
    device_id: str | None = None
    credential_id: str | None = None
    profile: str | None = None
    renews_automatically: bool = False
    renew_by: datetime | None = None  # when fleetgate renews it by itself

    @property
    def key(self) -> str:
        return f"{self.kind.value}:{self.id}"

    @property
    def alert_key(self) -> str:
        """One alert history per thing *and* end date: a re-imported credential or a new CRL
        under the same id starts afresh."""
        return f"{self.key}@{int(self.not_after.timestamp())}"


@dataclass
class MaintenanceReport:
    crls_refreshed: list[str] = field(default_factory=list)
    renewed: list[tuple[str, str]] = field(default_factory=list)  # (old serial, new serial)
    alerts_sent: list[str] = field(default_factory=list)
    alerts_failed: list[str] = field(default_factory=list)


class LifecycleService:
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

    # -- inventory -------------------------------------------------------------------------------

    async def inventory(
        self,
        *,
        expiring_within: timedelta | None = None,
        expired_within: timedelta | None = None,
        without_renewing_on_time: bool = False,
    ) -> list[InventoryItem]:
        """Everything with an end date that fleetgate issued or holds, soonest first.

        Certificates revoked or superseded by a renewal are left out, and so are expired ones
        unless they ended within ``expired_within``; with ``without_renewing_on_time``, so are
        those fleetgate renews by itself whose renewal is not overdue (most of a fleet's:
        :meth:`renewing_on_time` counts them).
        """
        now = self._clock.now()
        valid_at = now - expired_within if expired_within is not None else now
        horizon = now + expiring_within if expiring_within is not None else None
        fraction = self._authority.config.renew_at_fraction
        query = CertificateQuery(
            revoked=False,
            renewed=False,
            valid_at=valid_at,
            expiring_before=horizon,
            not_renewing_on_time=(
                (now, fraction, self._renewal_grace_s()) if without_renewing_on_time else None
            ),
        )
        items: list[InventoryItem] = []
        async with self._db.snapshot() as tx:
            after: str | None = None
            while True:
                batch = await CertificateRepo(tx).list(query, limit=PAGE, after=after)
                items.extend(_certificate_item(c, fraction) for c in batch)
                if len(batch) < PAGE:
                    break
                after = batch[-1].serial
            after = None
            while True:
                credentials = await CredentialRepo(tx).list(
                    limit=PAGE, after=after, expiring_before=horizon, imported_with_end=True
                )
                items.extend(
                    InventoryItem(
                        ItemKind.IMPORTED,
                        c.id,
                        _subject(c.certificate),
                        c.not_after,
                        device_id=c.device_id,
                        credential_id=c.id,
                    )
                    for c in credentials
                    if c.certificate_serial is None and c.not_after is not None
                )
                if len(credentials) < PAGE:
                    break
                after = credentials[-1].id
            for ca in await AuthorityRepo(tx).all():
                items.append(
                    InventoryItem(
                        ItemKind.CA,
                        ca.id,
                        ca.certificate.subject.rfc4514_string(),
                        ca.not_after,
                        profile=ca.role.value,
                    )
                )
            for crl in await CrlRepo(tx).all():
                lifetime = crl.next_update - crl.this_update
                refresh = crl.this_update + lifetime * self._authority.config.crl_refresh_fraction
                items.append(
                    InventoryItem(
                        ItemKind.CRL,
                        crl.issuer_id,
                        f"CRL of {crl.issuer_id}",
                        crl.next_update,
                        renews_automatically=True,
                        renew_by=refresh,
                    )
                )
        if horizon is not None:
            items = [i for i in items if i.not_after < horizon]
        return sorted(items, key=lambda i: (i.not_after, i.key))

    # -- the periodic pass -----------------------------------------------------------------------

    async def maintain(self, alerts: AlertConfig) -> MaintenanceReport:
        report = MaintenanceReport()
        report.crls_refreshed = await self._revocation.refresh_crls()
        await self._ensure_responders()
        report.renewed = await self.renew_due()
        sent, failed = await self.send_alerts(alerts)
        report.alerts_sent, report.alerts_failed = sent, failed
        return report

    async def _ensure_responders(self) -> None:
        now = self._clock.now()
        for ca in await self._authority.authorities():
            if ca.role is CaRole.ISSUING and ca.key_secret is not None and ca.not_after > now:
                await self._revocation.responder(ca)

    # -- renewal ---------------------------------------------------------------------------------

    async def renew_due(self) -> list[tuple[str, str]]:
        """Renew every certificate whose key fleetgate holds and whose renewal point passed.

        The new certificate certifies the same key (a device that holds an exported copy keeps
        working) and the old one stays valid until its own end.
        """
        now = self._clock.now()
        async with self._db.snapshot() as tx:
            due = await CertificateRepo(tx).due_for_renewal(now, limit=RENEWALS_PER_PASS)
        renewed: list[tuple[str, str]] = []
        for old in due:
            try:
                successor = await self._renew(old)
            except Exception as exc:  # noqa: BLE001 - one bad certificate must not stop the rest
                log.error("pki.renewal_failed", serial=old.serial, detail=str(exc))
                continue
            if successor is not None:
                renewed.append((old.serial, successor))
                log.info(
                    "pki.certificate_renewed",
                    serial=old.serial,
                    successor=successor,
                    credential=old.credential_id,
                    device=old.device_id,
                )
        return renewed

    async def _renew(self, old: IssuedCertificate) -> str | None:
        assert old.credential_id is not None
        if old.profile is Profile.OCSP_RESPONDER:
            async with self._db.snapshot() as tx:
                ca = await AuthorityRepo(tx).get(old.issuer_id)
            if ca is None:
                return None
            await self._revocation.make_responder(ca, replacing=old.serial)
            async with self._db.snapshot() as tx:
                refreshed = await CertificateRepo(tx).get(old.serial)
            return refreshed.renewed_by if refreshed else None
        async with self._db.transaction() as tx:
            credential = await CredentialRepo(tx).get(old.credential_id)
            if credential is None or credential.certificate_serial != old.serial:
                # The credential moved on (re-issued, deleted): nothing left to renew.
                await CertificateRepo(tx).mark_renewed(old.serial, "-")
                return None
            key_pem = await self._vault.get_in(tx, secret_name(credential.id))
            if key_pem is None:
                return None
            key = load_private_key_pem(key_pem.reveal())
            previous = x509.load_der_x509_certificate(old.der)
            record, chain = await self._authority.issue_in(
                tx,
                Issuance(
                    profile=old.profile,
                    subject=_subject_of(old.subject, previous),
                    public_key=key.public_key(),
                    lifetime=old.not_after - old.not_before - BACKDATE,
                    device_id=old.device_id,
                    credential_id=credential.id,
                ),
            )
            if not await CertificateRepo(tx).mark_renewed(old.serial, record.serial):
                raise RuntimeError(f"certificate {old.serial} was renewed by someone else")
            updated = replace(
                credential,
                certificate_serial=record.serial,
                certificate=record.der,
                chain=chain,
                not_after=record.not_after,
                updated_at=self._clock.now(),
                revision=credential.revision + 1,
            )
            await CredentialRepo(tx).replace(updated, expected_revision=credential.revision)
            await AuditRepo(tx).append(
                NewAuditEntry(
                    actor=SYSTEM_CALLER.principal.actor,
                    action="certificate.renew",
                    target_type="certificate",
                    target_id=old.serial,
                    before={"serial": old.serial, "not_after": old.not_after.isoformat()},
                    after={
                        "serial": record.serial,
                        "not_after": record.not_after.isoformat(),
                        "credential_id": credential.id,
                        "device_id": old.device_id,
                    },
                ),
                self._clock.now(),
            )
        return record.serial

    # -- alerts ----------------------------------------------------------------------------------

    def renewal_overdue(self, item: InventoryItem, now: datetime) -> bool:
        """Fleetgate should have renewed ``item`` by now (a few maintenance rounds after its
        renewal point): its renewal is failing."""
        grace = timedelta(seconds=self._renewal_grace_s())
        return item.renew_by is not None and now >= item.renew_by + grace

    def _renewal_grace_s(self) -> float:
        return float(max(3 * self._authority.config.maintenance_interval_s, 600))

    async def renewing_on_time(self) -> int:
        """How many live certificates fleetgate renews by itself are not overdue (one query,
        for /metrics: they are counted there, not listed)."""
        async with self._db.snapshot() as tx:
            return await CertificateRepo(tx).count_renewing_on_time(
                self._clock.now(),
                self._authority.config.renew_at_fraction,
                self._renewal_grace_s(),
            )

    async def send_alerts(self, config: AlertConfig) -> tuple[list[str], list[str]]:
        """Claim every newly crossed threshold, then send what is due; (sent, failed) keys."""
        now = self._clock.now()
        thresholds = sorted({int(d * 86400) for d in config.thresholds_days} | {0}, reverse=True)
        widest = timedelta(seconds=thresholds[0])
        # What fleetgate renews by itself is alerted on only once its renewal is overdue:
        # an alert then means "renewal is failing", not "this will expire".
        items = {
            i.alert_key: i
            for i in await self.inventory(
                expiring_within=widest, expired_within=EXPIRED_ALERT_WINDOW
            )
            if i.renew_by is None or self.renewal_overdue(i, now)
        }
        async with self._db.transaction() as tx:
            repo = AlertRepo(tx)
            for item in items.values():
                remaining = (item.not_after - now).total_seconds()
                crossed = [t for t in thresholds if remaining <= t]
                if not crossed:
                    continue
                closest = min(crossed)
                for threshold in crossed:
                    claimed = await repo.claim(item.alert_key, threshold, now)
                    if claimed and threshold != closest:
                        # Crossed several at once (an import with days left): send one alert.
                        await repo.record_attempt(
                            item.alert_key,
                            threshold,
                            sent_at=now,
                            error="superseded by a closer threshold",
                            next_attempt_at=now,
                        )
            due = []
            for subject, threshold, attempts in await repo.due(
                now, max_attempts=config.max_attempts
            ):
                # Take a lease first: a node that finds the row leased leaves it alone.
                if await repo.lease(subject, threshold, now, until=now + ALERT_LEASE):
                    due.append((subject, threshold, attempts))
        sent: list[str] = []
        failed: list[str] = []
        for subject, threshold, attempts in due:
            found = items.get(subject)
            error = await self._deliver(config, subject, threshold, found, now)
            backoff = min(timedelta(minutes=2**attempts), MAX_BACKOFF)
            async with self._db.transaction() as tx:
                await AlertRepo(tx).record_attempt(
                    subject,
                    threshold,
                    sent_at=None if error else now,
                    error=error,
                    next_attempt_at=now + backoff,
                )
                await AuditRepo(tx).append(
                    NewAuditEntry(
                        actor=SYSTEM_CALLER.principal.actor,
                        action="alert.expiry",
                        target_type=found.kind.value if found else subject.split(":", 1)[0],
                        target_id=found.id
                        if found
                        else subject.split(":", 1)[-1].rsplit("@", 1)[0],
                        after={
                            "threshold_days": threshold / 86400,
                            "attempt": attempts + 1,
                            "delivered": error is None,
                            "error": error,
                            "not_after": found.not_after.isoformat() if found else None,
                        },
                    ),
                    now,
                )
            shown = found.key if found else subject.rsplit("@", 1)[0]
            (failed if error else sent).append(f"{shown}@{threshold}")
        return sent, failed

    async def _deliver(
        self,
        config: AlertConfig,
        subject: str,
        threshold: int,
        item: InventoryItem | None,
        now: datetime,
    ) -> str | None:
        """None when delivered (or there is nowhere to deliver to), else why not."""
        payload: dict[str, Any] = {
            "event": "expiry",
            "subject": item.key if item is not None else subject.rsplit("@", 1)[0],
            "threshold_days": threshold / 86400,
            "at": now.isoformat(),
        }
        if item is not None:
            payload |= {
                "kind": item.kind.value,
                "id": item.id,
                "name": item.subject,
                "not_after": item.not_after.isoformat(),
                "device_id": item.device_id,
                "credential_id": item.credential_id,
                "renews_automatically": item.renews_automatically,
            }
        log.warning("pki.expiry_alert", **{k: v for k, v in payload.items() if k != "event"})
        if config.webhook_url is None:
            return None
        try:
            async with httpx.AsyncClient(timeout=config.webhook_timeout_s) as client:
                response = await client.post(config.webhook_url, json=payload)
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"[:300]
        if response.status_code >= 300:
            return f"webhook answered {response.status_code}"
        return None


def _certificate_item(c: IssuedCertificate, fraction: float) -> InventoryItem:
    held = c.credential_id is not None
    return InventoryItem(
        ItemKind.CERTIFICATE,
        c.serial,
        c.subject,
        c.not_after,
        device_id=c.device_id,
        credential_id=c.credential_id,
        profile=c.profile.value,
        renews_automatically=held,
        renew_by=c.not_before + (c.not_after - c.not_before) * fraction if held else None,
    )


def _subject(der: bytes | None) -> str:
    if der is None:
        return "-"
    return x509.load_der_x509_certificate(der).subject.rfc4514_string()


def _subject_of(common_name: str, certificate: x509.Certificate) -> Subject:
    """The same names again, for a renewal."""
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return Subject(common_name)
    return Subject(
        common_name,
        dns_names=tuple(san.get_values_for_type(x509.DNSName)),
        ip_addresses=tuple(str(a) for a in san.get_values_for_type(x509.IPAddress)),
        uris=tuple(san.get_values_for_type(x509.UniformResourceIdentifier)),
        emails=tuple(san.get_values_for_type(x509.RFC822Name)),
    )
