"""Revocation and how everyone learns of it: CRLs and the OCSP responder.

A revocation, the CRL that lists it and its audit entry commit together, so once the API has
answered, the new CRL is what /pki/crl.der serves on every node.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from fleetgate.auth.authz import require_group, require_write, require_writer
from fleetgate.clock import Clock, from_epoch_us
from fleetgate.config.schema import PkiConfig
from fleetgate.errors import Conflict, InvalidRequest, NotFound
from fleetgate.logs import get_logger
from fleetgate.pki.authority import Issuer, Subject
from fleetgate.pki.crl import RevocationReason, Revoked, build_crl
from fleetgate.pki.keys import algorithm_of, generate_key, load_private_key_pem
from fleetgate.pki.ocsp import Answer, CertStatus, OcspQuery, build_response, issuer_hashes
from fleetgate.pki.profiles import Profile
from fleetgate.pki.records import (
    CaRole,
    CertificateAuthority,
    CrlRecord,
    IssuedCertificate,
    normalize_serial,
)
from fleetgate.records import NewAuditEntry
from fleetgate.services.authority import AuthorityService, Issuance
from fleetgate.services.context import SYSTEM_CALLER, Caller
from fleetgate.services.issuing import keep_in_credential
from fleetgate.services.vault import Vault
from fleetgate.store import Database, Tx
from fleetgate.store.audit import AuditRepo
from fleetgate.store.authorities import AuthorityRepo
from fleetgate.store.certificates import CertificateRepo
from fleetgate.store.credentials import CredentialRepo, secret_name
from fleetgate.store.crls import CrlRepo
from fleetgate.store.database import advisory_lock, lock_key
from fleetgate.store.devices import DeviceRepo

log = get_logger("fleetgate.pki")


def responder_credential_id(issuer_id: str) -> str:
    return f"fleetgate-ocsp-{issuer_id}"


class RevocationService:
    def __init__(
        self, db: Database, vault: Vault, authority: AuthorityService, clock: Clock
    ) -> None:
        self._db = db
        self._vault = vault
        self._authority = authority
        self._clock = clock
        self._responders: dict[str, tuple[str, Issuer]] = {}  # issuer id -> (serial, responder)
        self._hashes: dict[tuple[str, str], tuple[bytes, bytes]] = {}

    @property
    def _config(self) -> PkiConfig:
        return self._authority.config

    # -- revoking --------------------------------------------------------------------------------

    async def revoke(
        self, caller: Caller, serial: str, reason: RevocationReason
    ) -> IssuedCertificate:
        serial = normalize_serial(serial)
        async with self._db.transaction() as tx:
            repo = CertificateRepo(tx)
            cert = await repo.get(serial)
            if cert is None:
                raise NotFound(f"no certificate with serial {serial} was issued here")
            group = None
            if cert.device_id is not None:
                device = await DeviceRepo(tx).get(cert.device_id)
                if device is not None:
                    group = device.group
                    require_write(caller.principal, group)
            if group is None:
                if caller.principal.scoped:
                    raise NotFound(f"no certificate with serial {serial} was issued here")
                require_writer(caller.principal)
            if cert.revoked:
                raise Conflict(f"certificate {serial} was revoked at {cert.revoked_at}")
            now = self._clock.now()
            await repo.revoke(serial, now, reason)
            await self.regenerate_crl(tx, cert.issuer_id)
            await AuditRepo(tx).append(
                NewAuditEntry(
                    actor=caller.principal.actor,
                    action="certificate.revoke",
                    target_type="certificate",
                    target_id=serial,
                    group=group,
                    request_id=caller.request_id,
                    source=caller.source,
                    after={
                        "reason": reason.value,
                        "device_id": cert.device_id,
                        "subject": cert.subject,
                    },
                ),
                now,
            )
            revoked = await repo.get(serial)
        assert revoked is not None
        log.info(
            "pki.certificate_revoked", serial=serial, reason=reason.value, device=cert.device_id
        )
        return revoked

    async def certificate(self, caller: Caller, serial: str) -> IssuedCertificate:
        async with self._db.snapshot() as tx:
            cert = await CertificateRepo(tx).get(normalize_serial(serial))
            if cert is not None and cert.device_id is not None:
                device = await DeviceRepo(tx).get(cert.device_id)
                if device is not None:
                    require_group(caller.principal, device.group)
                    return cert
        if cert is None or caller.principal.scoped:
            raise NotFound(f"no certificate with serial {serial} was issued here")
        return cert

    # -- CRLs ------------------------------------------------------------------------------------

    async def regenerate_crl(self, tx: Tx, issuer_id: str) -> CrlRecord:
        # One writer per issuer's CRL at a time, so concurrent revocations each see the
        # others' and CRL numbers never collide.
        await advisory_lock(tx, lock_key(f"crl:{issuer_id}"))
        ca = await AuthorityRepo(tx).get(issuer_id)
        if ca is None:
            raise NotFound(f"no CA {issuer_id}")
        issuer = await self._authority.issuer(tx, ca)
        now = self._clock.now()
        rows = await CertificateRepo(tx).revoked_by(issuer_id, still_valid_at=now)
        entries = [
            Revoked(
                int(r["serial"], 16),
                from_epoch_us(r["revoked_at"]),
                RevocationReason(r["revocation_reason"]),
            )
            for r in rows
        ]
        crls = CrlRepo(tx)
        current = await crls.get(issuer_id)
        number = current.number + 1 if current else 1
        next_update = now + timedelta(seconds=self._config.crl_lifetime_s)
        next_update = min(next_update, ca.not_after)
        crl = build_crl(issuer, entries, number=number, this_update=now, next_update=next_update)
        record = CrlRecord(
            issuer_id, number, now, next_update, crl.public_bytes(serialization.Encoding.DER)
        )
        if not await crls.put(record, previous_number=current.number if current else None):
            raise Conflict(f"the CRL of {issuer_id} changed meanwhile; try again")
        return record

    async def crl(self, issuer_id: str | None = None) -> CrlRecord:
        """The current CRL of ``issuer_id`` (default: the active issuing CA), made if missing."""
        async with self._db.snapshot() as tx:
            if issuer_id is None:
                active = await AuthorityRepo(tx).active(CaRole.ISSUING)
                if active is None:
                    raise NotFound("there is no issuing CA yet")
                issuer_id = active.id
            elif await AuthorityRepo(tx).get(issuer_id) is None:
                raise NotFound(f"no CA {issuer_id}")
            found = await CrlRepo(tx).get(issuer_id)
        if found is not None:
            return found
        async with self._db.transaction() as tx:
            existing = await CrlRepo(tx).get(issuer_id)
            return existing if existing is not None else await self.regenerate_crl(tx, issuer_id)

    async def _publishing(self) -> list[CertificateAuthority]:
        """Every CA still valid whose key fleetgate holds: each publishes a CRL. The active
        issuing CA first, then older issuing CAs, then roots (whose CRLs list issuing CAs)."""
        now = self._clock.now()
        found = [
            ca
            for ca in await self._authority.authorities()
            if ca.role in (CaRole.ISSUING, CaRole.ROOT)
            and ca.key_secret is not None
            and ca.not_after > now
        ]
        found.sort(key=lambda ca: (ca.role is CaRole.ROOT, not ca.active, ca.id))
        return found

    async def all_crls(self) -> list[CrlRecord]:
        """The CRL of every CA that publishes one (see :meth:`_publishing`)."""
        return [await self.crl(ca.id) for ca in await self._publishing()]

    async def refresh_crls(self) -> list[str]:
        """Regenerate every CRL past its refresh point (well before nextUpdate); ids refreshed."""
        now = self._clock.now()
        refreshed: list[str] = []
        for ca in await self._publishing():
            async with self._db.transaction() as tx:
                current = await CrlRepo(tx).get(ca.id)
                if current is not None:
                    lifetime = current.next_update - current.this_update
                    due = current.this_update + lifetime * self._config.crl_refresh_fraction
                    if now < due:
                        continue
                crl = await self.regenerate_crl(tx, ca.id)
                # On the change feed: mtls listeners load it (the one they hold will expire).
                await AuditRepo(tx).append(
                    NewAuditEntry(
                        actor=SYSTEM_CALLER.principal.actor,
                        action="crl.refresh",
                        target_type="ca",
                        target_id=ca.id,
                        after={
                            "number": crl.number,
                            "next_update": crl.next_update.isoformat(),
                        },
                    ),
                    now,
                )
            refreshed.append(ca.id)
        return refreshed

    # -- OCSP ------------------------------------------------------------------------------------

    async def _issuer_for(self, query: OcspQuery) -> CertificateAuthority | None:
        algorithm = query.hash_algorithm
        for ca in await self._authority.authorities():
            if ca.role is not CaRole.ISSUING or ca.key_secret is None:
                continue
            key = (ca.id, algorithm.name)
            if key not in self._hashes:
                self._hashes[key] = issuer_hashes(ca.certificate, algorithm)
            if self._hashes[key] == (query.issuer_name_hash, query.issuer_key_hash):
                return ca
        return None

    async def ocsp(self, query: OcspQuery) -> tuple[bytes, datetime]:
        """(DER response, when it stops being fresh) for a parsed request."""
        if not isinstance(
            query.hash_algorithm, (hashes.SHA1, hashes.SHA256, hashes.SHA384, hashes.SHA512)
        ):
            return unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST), self._clock.now()
        ca = await self._issuer_for(query)
        if ca is None:
            return unsuccessful(ocsp.OCSPResponseStatus.UNAUTHORIZED), self._clock.now()
        serial = format(query.serial, "x")
        async with self._db.snapshot() as tx:
            cert = await CertificateRepo(tx).get(serial)
        if cert is None or cert.issuer_id != ca.id:
            answer = Answer(CertStatus.UNKNOWN)
        elif cert.revoked:
            answer = Answer(CertStatus.REVOKED, cert.revoked_at, cert.revocation_reason)
        else:
            answer = Answer(CertStatus.GOOD)
        responder = await self.responder(ca)
        now = self._clock.now()
        next_update = now + timedelta(seconds=self._config.ocsp_validity_s)
        body = build_response(query, answer, responder, this_update=now, next_update=next_update)
        return body, next_update

    async def responder(self, ca: CertificateAuthority) -> Issuer:
        """The delegated OCSP signer of ``ca``: a credential fleetgate renews like any other."""
        credential_id = responder_credential_id(ca.id)
        async with self._db.snapshot() as tx:
            credential = await CredentialRepo(tx).get(credential_id)
        now = self._clock.now()
        if credential is not None and credential.not_after and credential.not_after > now:
            cached = self._responders.get(ca.id)
            if cached is not None and cached[0] == credential.certificate_serial:
                return cached[1]
            key_pem = await self._vault.get(secret_name(credential_id))
            assert key_pem is not None
            assert credential.certificate is not None
            responder = Issuer(
                ca.id,
                x509.load_der_x509_certificate(credential.certificate),
                load_private_key_pem(key_pem.reveal()),
            )
            self._responders[ca.id] = (credential.certificate_serial or "", responder)
            return responder
        await self.make_responder(ca)
        return await self.responder(ca)

    async def make_responder(
        self, ca: CertificateAuthority, *, replacing: str | None = None
    ) -> None:
        """Issue ``ca``'s responder certificate (again, when ``replacing`` names the old serial)."""
        algorithm = algorithm_of(ca.certificate.public_key())
        key = await asyncio.to_thread(generate_key, algorithm)
        credential_id = responder_credential_id(ca.id)
        async with self._db.transaction() as tx:
            repo = CredentialRepo(tx)
            existing = await repo.get(credential_id)
            now = self._clock.now()
            if (
                existing is not None
                and existing.certificate_serial != replacing
                and existing.not_after
                and existing.not_after > now
            ):
                return  # another task or node made one meanwhile
            # The responder must be signed by the CA it answers for, not the active one.
            record, _ = await self._authority.issue_in(
                tx,
                Issuance(
                    profile=Profile.OCSP_RESPONDER,
                    subject=Subject(f"fleetgate OCSP responder {ca.id}"),
                    public_key=key.public_key(),
                    lifetime=timedelta(days=self._config.ocsp_responder_lifetime_days),
                    credential_id=credential_id,
                ),
                ca=ca,
            )
            await keep_in_credential(
                tx,
                self._vault,
                credential_id,
                None,
                record,
                None,
                key,
                now,
                description=f"OCSP responder of {ca.id}",
                expected_revision=existing.revision if existing else None,
            )
            if replacing is not None and not await CertificateRepo(tx).mark_renewed(
                replacing, record.serial
            ):
                raise Conflict(f"the OCSP responder of {ca.id} was renewed by another node")


def unsuccessful(status: ocsp.OCSPResponseStatus) -> bytes:
    return ocsp.OCSPResponseBuilder.build_unsuccessful(status).public_bytes(
        serialization.Encoding.DER
    )


def parse_reason(text: str) -> RevocationReason:
    try:
        return RevocationReason(text)
    except ValueError:
        choices = ", ".join(r.value for r in RevocationReason)
        raise InvalidRequest(
            f"reason {text[:40]!r} is not one of {choices}", field="reason"
        ) from None
