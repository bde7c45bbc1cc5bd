"""Remote access sessions: open (checked against the token's groups, the group's allowed ports
and the device's registered address), read, close, expire, and their event log."""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from cryptography import x509

from fleetgate.auth.authz import in_scope, require_write
from fleetgate.clock import Clock
from fleetgate.config.schema import SessionsConfig
from fleetgate.errors import Conflict, InvalidRequest, NotFound
from fleetgate.pki.authority import Subject
from fleetgate.pki.keys import KeyAlgorithm, PrivateKey, generate_key, private_key_pem
from fleetgate.pki.profiles import Profile
from fleetgate.records import DeviceStatus, NewAuditEntry, Page
from fleetgate.remote.records import (
    EventKind,
    Session,
    SessionEvent,
    check_cidrs,
    valid_session_ports,
)
from fleetgate.sealing import Secret
from fleetgate.services.authority import AuthorityService, Issuance, pem
from fleetgate.services.context import (
    SYSTEM_CALLER,
    Caller,
    check_limit,
    decode_cursor,
    encode_cursor,
)
from fleetgate.services.vault import Vault
from fleetgate.store import Database, IntegrityViolation, Tx
from fleetgate.store.audit import AuditRepo
from fleetgate.store.devices import DeviceRepo
from fleetgate.store.groups import GroupRepo
from fleetgate.store.sealed import SealedSecretRepo
from fleetgate.store.sessions import SessionRepo

PORT_ATTEMPTS = 5  # a port taken by a concurrent open is retried with the next free one
MIN_DURATION_S = 5
# A public port another program holds is passed over for this long before it is tried again.
PORT_QUARANTINE_S = 300.0


@dataclass(frozen=True)
class SessionRequest:
    device_id: str
    port: int
    duration_s: int | None = None
    cidrs: tuple[str, ...] = ()  # default: the address the request came from
    tls: bool = False
    mtls: bool = False  # tls, and only a client certificate minted for this session gets in


@dataclass(frozen=True)
class ClientCredential:
    """The client certificate of an mtls session and its key, for its operator."""

    chain_pem: str
    key_pem: str


def _key_name(session_id: str) -> str:
    return f"session-key-{session_id}"


def session_snapshot(session: Session) -> dict[str, Any]:
    return {
        "id": session.id,
        "device_id": session.device_id,
        "device_port": session.device_port,
        "public_port": session.public_port,
        "cidrs": list(session.cidrs),
        "tls": session.tls,
        "mtls": session.client_serial is not None,
        "expires_at": session.expires_at.isoformat(),
    }


class SessionService:
    def __init__(
        self,
        db: Database,
        clock: Clock,
        config: SessionsConfig,
        authority: AuthorityService,
        vault: Vault,
    ) -> None:
        self._db = db
        self._clock = clock
        self.config = config
        self._authority = authority
        self._vault = vault
        self._quarantine: dict[int, float] = {}  # public port -> monotonic time it may be tried

    def quarantine_port(self, port: int) -> None:
        """Pass ``port`` over for a while: something outside fleetgate holds it."""
        self._quarantine[port] = self._clock.monotonic() + PORT_QUARANTINE_S

    def _unusable_ports(self) -> set[int]:
        now = self._clock.monotonic()
        for port in [p for p, until in self._quarantine.items() if until <= now]:
            del self._quarantine[port]
        return set(self._quarantine)

    # -- the API's use cases --------------------------------------------------------------------

    async def open(self, caller: Caller, request: SessionRequest) -> Session:
        config = self.config
        duration = request.duration_s or config.default_duration_s
        if not MIN_DURATION_S <= duration <= config.max_duration_s:
            raise InvalidRequest(
                f"a session lasts {MIN_DURATION_S} to {config.max_duration_s} seconds",
                field="duration_s",
            )
        if request.cidrs:
            cidrs = check_cidrs(request.cidrs)
        elif caller.source:
            cidrs = check_cidrs([caller.source])
        else:
            raise InvalidRequest("name the source CIDRs allowed to connect", field="cidrs")
        if request.mtls and not request.tls:
            raise InvalidRequest("mtls sessions terminate TLS: ask for tls too", field="mtls")
        key = await asyncio.to_thread(generate_key, KeyAlgorithm.EC_P256) if request.mtls else None
        now = self._clock.now()
        for _ in range(PORT_ATTEMPTS):
            try:
                async with self._db.transaction() as tx:
                    session = await self._open_in(tx, caller, request, cidrs, now, duration, key)
                return session
            except IntegrityViolation:
                continue  # another open took the same public port: take the next one
        raise Conflict("could not reserve a public port; try again")

    async def _open_in(
        self,
        tx: Tx,
        caller: Caller,
        request: SessionRequest,
        cidrs: tuple[str, ...],
        now: datetime,
        duration: int,
        client_key: PrivateKey | None,
    ) -> Session:
        device = await DeviceRepo(tx).get(request.device_id)
        if device is None or not in_scope(caller.principal, device.group):
            raise NotFound(f"device {request.device_id} does not exist")
        require_write(caller.principal, device.group)
        if device.status is not DeviceStatus.ENABLED:
            raise Conflict(f"device {device.id} is {device.status.value}")
        if not device.addresses:
            raise Conflict(f"device {device.id} has no registered address to reach")
        allowed = await self._allowed_ports(tx, device.group)
        if request.port not in allowed:
            raise InvalidRequest(
                f"port {request.port} is not open to sessions in group {device.group} "
                f"(allowed: {', '.join(map(str, sorted(allowed)))}; a group's "
                "settings.session_ports changes them)",
                field="port",
            )
        repo = SessionRepo(tx)
        taken = await repo.open_ports()
        unusable = self._unusable_ports()
        free = next(
            (p for p in self.config.port_range if p not in taken and p not in unusable), None
        )
        if free is None:
            held = f"; {len(unusable)} held by other programs" if unusable else ""
            raise Conflict(f"every public port of sessions.ports is in use{held}")
        session_id = f"s-{secrets.token_hex(8)}"
        client_serial = client_chain = None
        if client_key is not None:  # the session's own client certificate, gone with it
            record, chain = await self._authority.issue_in(
                tx,
                Issuance(
                    profile=Profile.UPSTREAM_CLIENT,
                    subject=Subject(f"session {session_id}"),
                    public_key=client_key.public_key(),
                    lifetime=timedelta(seconds=duration),
                    device_id=device.id,
                ),
            )
            client_serial = record.serial
            client_chain = pem(x509.load_der_x509_certificate(record.der)) + chain
            await self._vault.put_in(tx, _key_name(session_id), Secret(private_key_pem(client_key)))
        session = Session(
            id=session_id,
            device_id=device.id,
            group=device.group,
            device_address=device.addresses[0],
            device_port=request.port,
            public_port=free,
            cidrs=cidrs,
            tls=request.tls,
            created_at=now,
            expires_at=now + timedelta(seconds=duration),
            ended_at=None,
            end_reason=None,
            created_by=caller.principal.actor,
            client_serial=client_serial,
            client_chain=client_chain,
        )
        await repo.insert(session)
        await repo.add_event(
            session.id,
            now,
            EventKind.CREATED,
            source=caller.source,
            destination=f"{session.device_address}:{session.device_port}",
            detail={"by": caller.principal.actor, **session_snapshot(session)},
        )
        await self._audit(tx, caller, "session.create", session, now)
        return session

    async def _allowed_ports(self, tx: Tx, group: str) -> set[int]:
        found = await GroupRepo(tx).get(group)
        ports = found.settings.get("session_ports") if found is not None else None
        if ports is None:
            return set(self.config.allowed_ports)
        if not valid_session_ports(ports):  # written before the groups service checked it
            raise Conflict(
                f"group {group}: settings.session_ports is not a list of ports (1-65535); "
                "correct it with fleetgate group update"
            )
        return set(ports)

    async def get(self, caller: Caller, session_id: str) -> Session:
        async with self._db.snapshot() as tx:
            session = await SessionRepo(tx).get(session_id)
        if session is None or not in_scope(caller.principal, session.group):
            raise NotFound(f"session {session_id} does not exist")
        return session

    async def client_credential(self, caller: Caller, session_id: str) -> ClientCredential:
        """An mtls session's client certificate and key, while it is open (audited)."""
        session = await self.get(caller, session_id)
        require_write(caller.principal, session.group)
        if session.client_chain is None:
            raise Conflict(f"session {session_id} takes no client certificate (not mtls)")
        if not session.open:
            raise Conflict(f"session {session_id} has ended; its client certificate with it")
        async with self._db.transaction() as tx:
            key = await self._vault.get_in(tx, _key_name(session.id))
            if key is None:
                raise Conflict(f"session {session_id}: its client key is gone")
            await self._audit(tx, caller, "session.client_credential", session, self._clock.now())
        return ClientCredential(session.client_chain, key.reveal().decode())

    async def search(
        self,
        caller: Caller,
        *,
        device_id: str | None = None,
        open_only: bool = False,
        limit: int = 100,
        cursor: str | None = None,
    ) -> Page[Session]:
        check_limit(limit)
        async with self._db.snapshot() as tx:
            found = await SessionRepo(tx).search(
                limit=limit + 1,
                after=decode_cursor(cursor),
                device_id=device_id,
                groups=caller.principal.groups,
                open_only=open_only,
            )
        more = len(found) > limit
        items = found[:limit]
        return Page(items, encode_cursor(items[-1].id) if more else None)

    async def delete(self, caller: Caller, session_id: str) -> Session:
        session = await self.get(caller, session_id)
        require_write(caller.principal, session.group)
        now = self._clock.now()
        async with self._db.transaction() as tx:
            if not await SessionRepo(tx).end(session.id, now, "deleted"):
                raise Conflict(f"session {session_id} has ended already")
            await SealedSecretRepo(tx).delete(_key_name(session.id))
            await SessionRepo(tx).add_event(
                session.id, now, EventKind.DELETED, source=caller.source,
                detail={"by": caller.principal.actor},
            )  # fmt: skip
            await self._audit(tx, caller, "session.delete", session, now)
        return await self.get(caller, session_id)

    async def abandon(self, session_id: str, reason: str, why: str) -> None:
        """End a session the gateway could not serve (``bind_failed``: its public port is
        held by another program; ``tls_failed``: the sessions certificate would not load).
        The API then answers 409."""
        now = self._clock.now()
        async with self._db.transaction() as tx:
            repo = SessionRepo(tx)
            session = await repo.get(session_id)
            if session is None or not await repo.end(session_id, now, reason):
                return
            await SealedSecretRepo(tx).delete(_key_name(session_id))
            await repo.add_event(
                session_id, now, EventKind.REFUSED, detail={"reason": reason, "diagnosis": why}
            )
            await self._audit(tx, SYSTEM_CALLER, "session.abandon", session, now)

    async def end_for_device(self, device_id: str) -> list[str]:
        """End the device's open sessions it no longer allows: the device was deleted or
        disabled, lost the address a session dials, or moved to another group (whose ports
        and operators the session was not opened under). Their ids."""
        now = self._clock.now()
        ended: list[str] = []
        async with self._db.transaction() as tx:
            repo = SessionRepo(tx)
            sessions = await repo.search(
                limit=self.config.port_range.stop, device_id=device_id, open_only=True
            )
            if not sessions:
                return ended
            device = await DeviceRepo(tx).get(device_id)
            for session in sessions:
                if device is None:
                    reason = "device_deleted"
                elif device.status is not DeviceStatus.ENABLED:
                    reason = f"device_{device.status.value}"
                elif session.device_address not in device.addresses:
                    reason = "device_address_removed"
                elif device.group != session.group:
                    reason = "device_group_changed"
                else:
                    continue
                if await repo.end(session.id, now, reason):
                    await SealedSecretRepo(tx).delete(_key_name(session.id))
                    detail = {"reason": reason}
                    await repo.add_event(session.id, now, EventKind.ENDED, detail=detail)
                    await self._audit(tx, SYSTEM_CALLER, "session.end", session, now)
                    ended.append(session.id)
        return ended

    async def events(
        self, caller: Caller, session_id: str, *, limit: int = 100, cursor: str | None = None
    ) -> Page[SessionEvent]:
        await self.get(caller, session_id)  # NotFound outside the token's groups
        check_limit(limit)
        after = decode_cursor(cursor)
        async with self._db.snapshot() as tx:
            found = await SessionRepo(tx).events(
                session_id, limit=limit + 1, after=int(after) if after else None
            )
        more = len(found) > limit
        items = found[:limit]
        return Page(items, encode_cursor(str(items[-1].id)) if more else None)

    # -- the data plane and maintenance ----------------------------------------------------------

    async def open_sessions(self) -> list[Session]:
        """Every session still open (what the data plane binds at start)."""
        async with self._db.snapshot() as tx:
            return await SessionRepo(tx).search(limit=self.config.port_range.stop, open_only=True)

    async def find(self, session_id: str) -> Session | None:
        async with self._db.snapshot() as tx:
            return await SessionRepo(tx).get(session_id)

    async def expire_due(self) -> list[str]:
        """End the sessions whose time ran out; their ids."""
        now = self._clock.now()
        ended: list[str] = []
        async with self._db.transaction() as tx:
            repo = SessionRepo(tx)
            for session in await repo.due(now):
                if await repo.end(session.id, now, "expired"):
                    await SealedSecretRepo(tx).delete(_key_name(session.id))
                    await repo.add_event(session.id, now, EventKind.EXPIRED)
                    await self._audit(tx, SYSTEM_CALLER, "session.expire", session, now)
                    ended.append(session.id)
        return ended

    async def prune_events(self) -> int:
        before = self._clock.now() - timedelta(days=self.config.event_retention_days)
        async with self._db.transaction() as tx:
            return await SessionRepo(tx).prune_events(before)

    async def record(
        self,
        session_id: str,
        kind: EventKind,
        *,
        source: str | None = None,
        destination: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """One event the data plane saw."""
        async with self._db.transaction() as tx:
            await SessionRepo(tx).add_event(
                session_id, self._clock.now(), kind,
                source=source, destination=destination, detail=detail,
            )  # fmt: skip

    async def _audit(
        self, tx: Tx, caller: Caller, action: str, session: Session, now: datetime
    ) -> None:
        await AuditRepo(tx).append(
            NewAuditEntry(
                actor=caller.principal.actor,
                action=action,
                target_type="session",
                target_id=session.id,
                group=session.group,
                request_id=caller.request_id,
                source=caller.source,
                after=session_snapshot(session),
            ),
            now,
        )
