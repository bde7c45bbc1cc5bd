"""Remote access sessions on the wire: one listener per open session, bound while the session is
open (in the main process only: a session's port is one socket), closed with every live
connection through it when the session ends.

Each connection: the source must be inside the session's CIDRs (else ``DENIED``); a ``tls``
session terminates TLS with the sessions certificate, and a client that spoke something else is
``REFUSED`` with a diagnosis in plain words; a plain session refuses a client that starts TLS the
same way. Then the device's registered address and port are dialled and the bytes spliced;
``CONNECTED`` and ``CLOSED`` (duration, bytes each way) are recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fleetgate.clock import Clock
from fleetgate.config.schema import ListenerTlsConfig
from fleetgate.dataplane.endpoint import Endpoint, PlainEndpoint
from fleetgate.dataplane.psk import PskTable
from fleetgate.dataplane.server_tls import ServerTls, TlsSetupError
from fleetgate.dataplane.splice import splice
from fleetgate.dataplane.tls_endpoint import TlsEndpoint, TlsFailure
from fleetgate.errors import FleetgateError
from fleetgate.logs import bind, get_logger
from fleetgate.remote.records import BindFailure, EventKind, Session
from fleetgate.remote.sniff import (
    diagnose_on_plain_session,
    diagnose_on_tls_session,
    looks_like_tls,
)
from fleetgate.services.bundle import Services
from fleetgate.store.changes import Change

log = get_logger("fleetgate.sessions")
HANDSHAKE_TIMEOUT_S = 10.0
DEVICE_CONNECT_TIMEOUT_S = 10.0
SWEEP_S = 60.0  # at the latest, expiry is checked this often (timers wake it sooner)
PRUNE_EVERY_S = 3600.0


# The splice calls its sides device and destination; here they are the client and the device.
_CLOSE_REASONS = {"device_lost": "client_lost", "destination_lost": "device_lost"}


class _NotTls(ValueError):
    """A plain session's client started a TLS handshake."""


@dataclass
class _Bound:
    session: Session
    server: asyncio.Server | None = None  # set once bound
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


class _Accepted(PlainEndpoint):
    __slots__ = ("_bound", "_plane")

    def __init__(self, bound: _Bound, plane: SessionPlane) -> None:
        super().__init__()
        self._bound, self._plane = bound, plane

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._plane.accepted(self._bound, self)


class _AcceptedTls(TlsEndpoint):
    __slots__ = ("_bound", "_plane")

    def __init__(self, bound: _Bound, plane: SessionPlane, tls: ServerTls) -> None:
        super().__init__(tls.context, server_side=True)
        self._bound, self._plane = bound, plane

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._plane.accepted(self._bound, self)


class SessionPlane:
    def __init__(
        self, services: Services, clock: Clock, settle: Callable[[], Awaitable[object]]
    ) -> None:
        self._settle = settle
        self._services = services
        self._clock = clock
        self._config = services.sessions.config
        self._bound: dict[str, _Bound] = {}
        self._bind_failures: dict[str, BindFailure] = {}  # session id -> why it is not served
        self._wake = asyncio.Event()
        self._sweeper: asyncio.Task[None] | None = None
        self._tls = ServerTls(
            "sessions",
            ListenerTlsConfig(
                mode="tls",
                certificate=self._config.certificate,
                server_names=self._config.server_names,
            ),
            services,
            PskTable(services),
            clock,
        )
        # mtls sessions: the same certificate, and clients verified against fleetgate's CAs;
        # each connection must then present its own session's certificate.
        self._mtls = ServerTls(
            "sessions-mtls",
            ListenerTlsConfig(
                mode="mtls",
                certificate=self._config.certificate,
                server_names=self._config.server_names,
            ),
            services,
            PskTable(services),
            clock,
        )
        self._tls_loaded = False

    @property
    def bound(self) -> dict[str, int]:
        """Open sessions being served: id -> public port."""
        return {sid: b.session.public_port for sid, b in self._bound.items()}

    async def start(self) -> None:
        """Bind every open session (after a restart too) and watch for expiry."""
        await self._services.sessions.expire_due()  # what ran out while nobody watched
        await self.sync()
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def bind_failure(self, session_id: str) -> BindFailure | None:
        """Why a just-opened session is not served, once the change feed has reached here
        (``settle``: the API process's own poll of the feed)."""
        await self._settle()
        return self._bind_failures.pop(session_id, None)

    async def on_change(self, change: Change) -> None:
        if change.target_type == "session":
            await self.sync()
        elif change.target_type == "device":
            # A device deleted, disabled, re-addressed or moved ends its sessions (each node
            # tries; the store ends each once), and so cuts their connections here.
            if await self._services.sessions.end_for_device(change.target_id):
                await self.sync()
        elif change.target_type in ("certificate", "ca", "credential") and self._tls_loaded:
            await self._reload_tls(change.action)

    async def _reload_tls(self, why: str) -> None:
        """New handshakes use the renewed or replaced sessions certificate, and mtls sessions
        the current CAs and CRLs; connections already made keep theirs."""
        await self._tls.reload(why)
        if any(b.session.client_serial is not None for b in self._bound.values()):
            await self._mtls.reload(why)

    async def sync(self) -> None:
        """Make the bound listeners match the open sessions in the store."""
        open_now = {s.id: s for s in await self._services.sessions.open_sessions()}
        for session_id in [sid for sid in self._bind_failures if sid not in open_now]:
            del self._bind_failures[session_id]  # ended: nobody will ask why any more
        for session_id in [sid for sid in self._bound if sid not in open_now]:
            ended = await self._services.sessions.find(session_id)
            await self._unbind(session_id, ended.end_reason if ended else None)
        now = self._clock.now()
        for session in open_now.values():
            if session.id not in self._bound and session.expires_at > now:
                await self._bind(session)
        self._wake.set()

    async def close(self) -> None:
        """Stop serving (the sessions stay open in the store: a restart binds them again)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        for session_id in list(self._bound):
            await self._unbind(session_id, "shutdown")

    # -- binding -------------------------------------------------------------------------------

    async def _bind(self, session: Session) -> None:
        if session.tls:
            try:
                if not self._tls_loaded:
                    await self._tls.load()  # the sessions certificate, issued on first use
                    self._tls_loaded = True
                if session.client_serial is not None:
                    await self._mtls.load()  # fresh: the CAs the new certificate chains to
            except TlsSetupError as exc:
                self._bind_failures[session.id] = BindFailure("tls_failed", exc.args[0])
                log.error("session.tls_failed", session=session.id, detail=str(exc))
                return
        loop = asyncio.get_running_loop()
        bound = _Bound(session)

        def factory() -> Endpoint:
            if session.client_serial is not None:
                return _AcceptedTls(bound, self, self._mtls)
            if session.tls:
                return _AcceptedTls(bound, self, self._tls)
            return _Accepted(bound, self)

        try:
            bound.server = await loop.create_server(
                factory, self._config.bind, session.public_port, reuse_address=True
            )
        except OSError as exc:
            why = exc.strerror or str(exc)
            self._bind_failures[session.id] = BindFailure("bind_failed", why)
            log.error(
                "session.bind_failed", session=session.id, port=session.public_port, detail=why
            )
            return
        self._bound[session.id] = bound
        log.info(
            "session.bound",
            session=session.id,
            device=session.device_id,
            port=session.public_port,
            tls=session.tls,
            expires_at=session.expires_at.isoformat(),
        )

    async def _unbind(self, session_id: str, reason: str | None) -> None:
        bound = self._bound.pop(session_id, None)
        if bound is None:
            return
        if bound.server is not None:
            bound.server.close()
        live = list(bound.tasks)
        for task in live:
            task.cancel()  # each records its own CLOSED
        if live:
            await asyncio.gather(*live, return_exceptions=True)
        log.info("session.unbound", session=session_id, reason=reason, cut=len(live))

    # -- expiry ---------------------------------------------------------------------------------

    async def _sweep(self) -> None:
        pruned_at = -math.inf
        while True:
            self._wake.clear()
            now = self._clock.now()
            soonest = min((b.session.expires_at for b in self._bound.values()), default=None)
            wait = SWEEP_S
            if soonest is not None:
                wait = min(wait, max((soonest - now).total_seconds(), 0.0))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            try:
                if await self._services.sessions.expire_due():
                    await self.sync()
                now = self._clock.now()
                for tls in (self._tls, self._mtls):
                    if tls.staple_due(now):
                        await tls.refresh_staple()
                if self._clock.monotonic() - pruned_at >= PRUNE_EVERY_S:
                    await self._services.sessions.prune_events()
                    pruned_at = self._clock.monotonic()
            except FleetgateError as exc:  # the store is away: try again at the next sweep
                log.error("session.sweep_failed", detail=str(exc))

    # -- one connection -------------------------------------------------------------------------

    def accepted(self, bound: _Bound, endpoint: Endpoint) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(bound, endpoint))
        bound.tasks.add(task)
        task.add_done_callback(bound.tasks.discard)

    async def _record(self, session: Session, kind: EventKind, **fields: Any) -> None:
        try:
            await self._services.sessions.record(session.id, kind, **fields)
        except FleetgateError as exc:
            log.error("session.event_lost", session=session.id, kind=kind.value, detail=str(exc))
            return
        log.info("session.event", session=session.id, kind=kind.value)

    async def _serve(self, bound: _Bound, endpoint: Endpoint) -> None:
        session = bound.session
        peer = endpoint.peer_address()
        source = f"{peer[0]}:{peer[1]}" if peer else "?"
        destination = f"{session.device_address}:{session.device_port}"
        with bind(session=session.id, source=source):
            try:
                if peer is None or not session.allows(peer[0]):
                    await self._record(
                        session, EventKind.DENIED, source=source, destination=destination,
                        detail={"reason": "the source is outside the session's CIDRs",
                                "cidrs": list(session.cidrs)},
                    )  # fmt: skip
                    log.warning("session.denied")
                    endpoint.abort()
                    return
                await self._record(session, EventKind.ACCESS, source=source)
                if isinstance(endpoint, TlsEndpoint) and not await self._handshake(
                    session, endpoint, source
                ):
                    return
                await self._relay(session, endpoint, source, destination)
            finally:
                endpoint.close()

    async def _handshake(self, session: Session, endpoint: TlsEndpoint, source: str) -> bool:
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                await endpoint.handshake
        except (TimeoutError, TlsFailure) as exc:
            opening = bytes(endpoint.opening)
            cause = exc.cause if isinstance(exc, TlsFailure) else "handshake_timeout"
            if cause in ("not_tls", "handshake_timeout") and not looks_like_tls(opening):
                diagnosis = diagnose_on_tls_session(opening)
            elif cause in ("no_client_certificate", "unknown_ca", "certificate_expired"):
                diagnosis = (
                    f"the client's certificate was not accepted ({cause}); this session admits "
                    "only the certificate minted for it: fleetgate connect --session presents it"
                )
            else:
                diagnosis = f"the TLS handshake failed: {cause}"
            await self._record(
                session, EventKind.REFUSED, source=source,
                detail={"reason": cause, "diagnosis": diagnosis},
            )  # fmt: skip
            log.warning("session.refused", reason=cause, diagnosis=diagnosis)
            return False
        if session.client_serial is not None:
            der = endpoint.ssl_object.getpeercert(binary_form=True)
            serial = format(x509.load_der_x509_certificate(der).serial_number, "x") if der else None
            if der is None or der != _client_der(session):
                diagnosis = (
                    "this session admits only the client certificate minted for it; "
                    "fleetgate connect --session fetches and presents it"
                )
                await self._record(
                    session, EventKind.REFUSED, source=source,
                    detail={"reason": "not_this_sessions_certificate", "diagnosis": diagnosis,
                            "presented_serial": serial},
                )  # fmt: skip
                return False
        return True

    async def _relay(
        self, session: Session, endpoint: Endpoint, source: str, destination: str
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(DEVICE_CONNECT_TIMEOUT_S):
                _, device = await loop.create_connection(
                    PlainEndpoint, session.device_address, session.device_port
                )
        except (OSError, TimeoutError) as exc:
            detail = str(exc) or "no answer in time"
            await self._record(
                session, EventKind.REFUSED, source=source, destination=destination,
                detail={"reason": "device_unreachable",
                        "diagnosis": f"the device did not accept the connection: {detail}"},
            )  # fmt: skip
            return
        await self._record(session, EventKind.CONNECTED, source=source, destination=destination)
        started = self._clock.monotonic()
        first = [True]

        def check_first(chunk: bytes) -> bytes:
            """A plain session's client must not start TLS (its device does not speak it)."""
            if first[0] and chunk:
                first[0] = False
                if looks_like_tls(chunk):
                    raise _NotTls(diagnose_on_plain_session())
            return chunk

        reason = "cut: the session ended"
        try:
            remaining = (session.expires_at - self._clock.now()).total_seconds()
            result = await splice(
                endpoint,
                device,
                self._clock,
                idle_timeout_s=max(remaining, 1.0),
                up=None if session.tls else check_first,
            )
            reason = _CLOSE_REASONS.get(result.reason, result.reason)
        finally:
            device.close()
            # What each side delivered (the splice's counts, also when it was cancelled).
            up, down = endpoint.received, device.received
            refused = reason.startswith("protocol_error")
            await self._record(
                session,
                EventKind.REFUSED if refused else EventKind.CLOSED,
                source=source,
                destination=destination,
                detail={
                    "reason": "tls_on_plain_session" if refused else reason,
                    **({"diagnosis": diagnose_on_plain_session()} if refused else {}),
                    "duration_s": round(self._clock.monotonic() - started, 3),
                    "up_bytes": up,
                    "down_bytes": down,
                },
            )


def _client_der(session: Session) -> bytes | None:
    """The DER of the client certificate minted for an mtls session (first in its chain)."""
    if session.client_chain is None:
        return None
    leaf = x509.load_pem_x509_certificates(session.client_chain.encode())[0]
    return leaf.public_bytes(serialization.Encoding.DER)
