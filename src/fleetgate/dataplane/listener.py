"""A device-facing stream listener (tcp, mqtt, http): accept, hand each connection to its
protocol's handler, account for it, and cut it when the registry no longer allows it.

Handlers (``proxy_tcp``, ``proxy_mqtt``, ``proxy_http``) read what they need from the device,
resolve the device and its route through the :class:`DataPath`, and proxy (http) or hand back a
:class:`Relay` once the destination accepted. A refusal is answered in the device's protocol by
the handler and logged here with its reason; nobody else is affected.

A connection is its handler's task while it is set up, then, once relayed, only its splice: the
task ends there, and with it the frames of everything the set-up used (an idle gateway holds
tens of thousands of relayed connections). The listener knows each connection by its
:class:`Conn` in both stages: to count it, cut it, and wait for it at a drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from fleetgate.config.schema import ListenerConfig, split_host_port
from fleetgate.dataplane.affinity import PortSharing
from fleetgate.dataplane.datapath import DataPath, Refused, refusal_after_handshake
from fleetgate.dataplane.endpoint import Endpoint, PlainEndpoint
from fleetgate.dataplane.server_tls import ServerTls
from fleetgate.dataplane.splice import SpliceResult, Splicing, Transform, start_splice
from fleetgate.dataplane.tls_endpoint import TlsEndpoint, TlsFailure
from fleetgate.logs import bind, get_logger
from fleetgate.records import Device

log = get_logger("fleetgate.dataplane")
_conn_ids = itertools.count(1)
# On a psk listener some failures can only mean one thing.
_PSK_CAUSES = {
    "no_suitable_signature": "unknown_psk_identity",  # TLS 1.3: no PSK of ours was offered
    "bad_record_mac": "wrong_psk",  # TLS 1.2: the Finished did not decrypt
}
_NO_SHA256_SUITE = (
    "TLS 1.3 with a PSK needs TLS_AES_128_GCM_SHA256 or TLS_CHACHA20_POLY1305_SHA256; "
    "the device offered neither"
)


@dataclass(eq=False, slots=True)  # a set member, known by identity
class Conn:
    """One accepted device connection, as handlers see it."""

    id: str
    listener: str
    config: ListenerConfig
    endpoint: Endpoint
    source: str
    path: DataPath
    device_id: str | None = None
    on_device: Callable[[Conn, str], None] = field(default=lambda conn, device: None)
    peer_certificate: bytes | None = None  # mtls: the device's verified certificate (DER)
    psk_identity: str | None = None  # psk: the identity whose key the handshake used
    # What authenticated the device, once known: a certificate serial or a PSK credential id.
    credential: str | None = None
    # mtls: the serial of the verified client certificate, whatever identified the device (a
    # revocation cuts the connections it opened).
    client_serial: str | None = None
    # Where the connection is: its handler's task while being set up, then its splice.
    task: asyncio.Task[None] | None = None
    splicing: Splicing | None = None

    async def device(self) -> Device:
        """The device this connection is, by what the listener trusts for it: the verified
        client certificate, the PSK of the handshake, or the source address. (A login in the
        device's protocol is the handler's business.)"""
        if self.peer_certificate is not None:  # revoked is revoked, however names are found
            self.client_serial = await self.path.admit_certificate(self.peer_certificate)
        if self.config.identity == "certificate":
            assert self.config.tls is not None
            if self.peer_certificate is None:
                raise Refused("no_client_certificate", "the handshake brought no certificate")
            device, self.credential = await self.path.by_certificate(
                self.peer_certificate, self.config.tls.device_name_from
            )
            return device
        if self.config.identity == "psk":
            device, self.credential = await self.path.by_psk(self.psk_identity)
            return device
        return await self.path.by_source(self.source)

    def connected(self, destination: str, **fields: object) -> None:
        """The destination accepted: from here on bytes are relayed."""
        self.path.metrics.listener_connections.labels(self.listener, "relayed").inc()
        log.info("listener.connected", destination=destination, **fields)

    def identified(self, device_id: str) -> None:
        """The handler knows the device: from now on a revocation can cut this connection."""
        self.device_id = device_id
        self.on_device(self, device_id)


@dataclass(frozen=True, slots=True)
class Relay:
    """What a handler hands back once the destination accepted: relay between the device and
    ``upstream`` (the relay owns it from here) until either ends, optionally rewriting each
    direction."""

    upstream: Endpoint
    up: Transform | None = None
    down: Transform | None = None
    # An upstream that ends before sending anything refused us (a TLS 1.3 server's alert on
    # our certificate comes after the handshake): the end is logged as that refusal.
    silence_is_refusal: bool = False


Handler = Callable[[Conn], Awaitable[Relay | None]]


class _Accepted(PlainEndpoint):
    __slots__ = ("_on_made",)

    def __init__(self, on_made: Callable[[Endpoint], None]) -> None:
        super().__init__()
        self._on_made = on_made

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._on_made(self)


class _AcceptedTls(TlsEndpoint):
    """A device connection on a tls/mtls listener: the handshake runs as bytes arrive, and a
    failed one sends its alert before closing (asyncio's own TLS server closes silently)."""

    __slots__ = ("_on_made",)

    def __init__(self, context: ssl.SSLContext, on_made: Callable[[Endpoint], None]) -> None:
        super().__init__(context, server_side=True)
        self._on_made = on_made

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._on_made(self)


@dataclass
class ListenerLoad:
    """What a listener holds, counted against its caps. One per listener name, shared by the
    instance serving now and those a reload retired while their connections finish, so that a
    reload does not open room for a second ``max_connections`` (or per-source, per-device; a
    udp listener counts its requests in flight, for ``max_in_flight``)."""

    connections: int = 0
    per_source: Counter[str] = field(default_factory=Counter)
    per_device: Counter[str] = field(default_factory=Counter)


class StreamListener:
    def __init__(
        self,
        name: str,
        config: ListenerConfig,
        path: DataPath,
        handler: Handler,
        *,
        sharing: PortSharing | None,
        tls: ServerTls | None = None,
        load: ListenerLoad | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self.tls = tls
        self._path = path
        self._handler = handler
        self._sharing = sharing
        self._server: asyncio.Server | None = None
        self._live: set[Conn] = set()
        self._emptied: asyncio.Future[None] | None = None  # while a drain waits
        # This instance's connections by device: what a revocation cuts.
        self._by_device: dict[str, set[Conn]] = {}
        self.load = load if load is not None else ListenerLoad()

    @property
    def active(self) -> int:
        return len(self._live)

    @property
    def bound_addresses(self) -> list[tuple[str, int]]:
        if self._server is None:
            return []
        return [s.getsockname()[:2] for s in self._server.sockets]

    async def start(self) -> None:
        host, port = split_host_port(self.config.bind)
        loop = asyncio.get_running_loop()
        if self.tls is not None:
            await self.tls.load()  # TlsSetupError: not bound, and /readyz says why
        self._server = await loop.create_server(
            self._endpoint,
            host or None,
            port,
            reuse_address=True,
            reuse_port=self._sharing is not None or None,
            backlog=4096,
        )
        if self._sharing is not None:
            for sock in self._server.sockets:
                self._sharing.steer(sock)
        self._path.metrics.listener_up.labels(self.name).set(1)
        log.info("listener.bound", listener=self.name, addresses=self.bound_addresses)

    async def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()
        with contextlib.suppress(KeyError):
            self._path.metrics.listener_up.remove(self.name)

    async def drain(self, timeout_s: float) -> None:
        """Let live connections finish for up to ``timeout_s``, then cut the rest."""
        if not self._live:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._all_ended()
        for conn in list(self._live):
            _stop(conn)
        await self._all_ended()

    async def _all_ended(self) -> None:
        while self._live:
            if self._emptied is None:
                self._emptied = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._emptied)  # (a drain's timeout leaves it for the next)

    def devices_connected(self) -> set[str]:
        return set(self._by_device)

    def cut(
        self,
        device_id: str,
        reason: str,
        *,
        keep_sources: tuple[str, ...] | None = None,
        credential: str | None = None,
    ) -> int:
        """Close ``device_id``'s live connections; how many. With ``keep_sources``, only
        those its source address identified, except from these addresses (a certificate or
        a PSK does not depend on the address); with ``credential``, only those it
        authenticated."""
        targets = [
            (device_id, conn)
            for conn in self._by_device.get(device_id, ())
            if not (
                keep_sources is not None
                and (conn.source in keep_sources or conn.config.identity != "source_address")
            )
            and (credential is None or conn.credential == credential)
        ]
        return len(self._cancel(targets, reason))

    def cut_certificate(self, serial: str) -> list[str]:
        """Close the connections the client certificate ``serial`` opened, whichever device
        they identified as; the devices, once per connection cut."""
        targets = [
            (device_id, conn)
            for device_id, held in self._by_device.items()
            for conn in held
            if conn.client_serial == serial
        ]
        return self._cancel(targets, "certificate_revoked")

    def _cancel(self, targets: list[tuple[str, Conn]], reason: str) -> list[str]:
        for device_id, conn in targets:
            _stop(conn)
            log.warning(
                "listener.connection_cut",
                listener=self.name,
                device=device_id,
                source=conn.source,
                reason=reason,
            )
        if targets:
            labels = self._path.metrics.listener_connections.labels(self.name, f"cut_{reason}")
            labels.inc(len(targets))
        return [device_id for device_id, _ in targets]

    # -- one connection ---------------------------------------------------------------------------

    def _endpoint(self) -> Endpoint:
        if self.tls is not None:
            return _AcceptedTls(self.tls.context, self._accepted)  # the newest good context
        return _Accepted(self._accepted)

    def _accepted(self, endpoint: Endpoint) -> None:
        """A new connection (from ``connection_made``: before any of its bytes is read, so a
        connection over the caps is reset before a TLS handshake starts)."""
        peer = endpoint.peer_address()
        source = peer[0] if peer else "?"
        metrics = self._path.metrics
        refusal = self._over_limit(source)
        if refusal is not None:
            metrics.listener_connections.labels(self.name, refusal).inc()
            log.warning("listener.refused", listener=self.name, source=source, reason=refusal)
            endpoint.abort()
            return
        self.load.connections += 1
        self.load.per_source[source] += 1
        metrics.listener_active.labels(self.name).inc()
        conn = Conn(
            id=f"{self.name}-{next(_conn_ids)}",
            listener=self.name,
            config=self.config,
            endpoint=endpoint,
            source=source,
            path=self._path,
            on_device=self._register,
        )
        self._live.add(conn)
        conn.task = asyncio.get_running_loop().create_task(self._serve(conn))
        conn.task.add_done_callback(functools.partial(self._set_up, conn))

    def _set_up(self, conn: Conn, _: asyncio.Task[None]) -> None:
        """Its handler's task ended: the connection is relayed, or over."""
        conn.task = None
        if conn.splicing is None:
            self._ended(conn)

    def _ended(self, conn: Conn) -> None:
        """The connection is over: accounted once, whichever stage it ended in (a relay that
        ends as it starts is over before its set-up task's own end is heard of)."""
        if conn not in self._live:
            return
        self._unregister(conn)
        conn.endpoint.close()
        self._live.discard(conn)
        self._path.metrics.listener_active.labels(self.name).dec()
        self.load.connections -= 1
        _take_one(self.load.per_source, conn.source)
        if not self._live and self._emptied is not None:
            emptied, self._emptied = self._emptied, None
            emptied.set_result(None)

    def _register(self, conn: Conn, device_id: str) -> None:
        held = self.load.per_device[device_id]
        limit = self.config.max_per_device
        if limit is not None and held >= limit:
            raise Refused("device_limit", f"{device_id} holds {held} connections already")
        mine = self._by_device.setdefault(device_id, set())
        if conn not in mine:
            self.load.per_device[device_id] += 1
            mine.add(conn)

    def _unregister(self, conn: Conn) -> None:
        if conn.device_id is None:
            return
        mine = self._by_device.get(conn.device_id)
        if mine is None or conn not in mine:
            return
        mine.discard(conn)
        _take_one(self.load.per_device, conn.device_id)
        if not mine:
            del self._by_device[conn.device_id]

    def _over_limit(self, source: str) -> str | None:
        """Why a new connection from ``source`` is one too many, if it is."""
        if self.load.connections >= self.config.max_connections:
            return "listener_full"
        limit = self.config.max_per_source
        if limit is not None and self.load.per_source[source] >= limit:
            return "source_limit"
        return None

    async def _handshake(self, conn: Conn, endpoint: TlsEndpoint) -> None:
        """The device's TLS handshake, in bounded time; a failure is refused by its cause
        (the alert already went to the device)."""
        assert self.tls is not None
        timeout_s = self.tls.config.handshake_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                await endpoint.handshake
        except TimeoutError:
            raise Refused("handshake_timeout", f"no TLS handshake within {timeout_s} s") from None
        except TlsFailure as exc:
            if self.tls.config.mode != "psk":
                raise Refused(exc.cause, exc.detail) from None
            if exc.cause == "no_suitable_signature" and endpoint.psk_identity is not None:
                # The key was found (the lookup saw the identity), yet OpenSSL could not use it:
                # external PSKs go with a SHA-256 suite, and the device offered none.
                raise Refused("psk_suite_unsupported", _NO_SHA256_SUITE) from None
            raise Refused(_PSK_CAUSES.get(exc.cause, exc.cause), exc.detail) from None
        if self.tls.config.mode == "psk":
            conn.psk_identity = endpoint.psk_identity
        else:
            conn.peer_certificate = endpoint.ssl_object.getpeercert(binary_form=True)

    async def _serve(self, conn: Conn) -> None:
        endpoint = conn.endpoint
        metrics = self._path.metrics
        with bind(listener=self.name, conn=conn.id, source=conn.source):
            try:
                if isinstance(endpoint, TlsEndpoint):
                    await self._handshake(conn, endpoint)
                relay = await self._handler(conn)
                if relay is not None:  # from here the splice has it, and this task ends
                    self._relay(conn, relay)
            except Refused as exc:
                self._refused(conn, exc)
            except asyncio.CancelledError:
                log.info("listener.closed", reason="cancelled", device=conn.device_id)
                raise
            except (ConnectionError, OSError, TimeoutError) as exc:
                metrics.listener_connections.labels(self.name, "connection_lost").inc()
                log.info(
                    "listener.closed",
                    reason="connection_lost",
                    device=conn.device_id,
                    detail=str(exc) or type(exc).__name__,
                )

    def _relay(self, conn: Conn, relay: Relay) -> None:
        try:
            conn.splicing = start_splice(
                conn.endpoint,
                relay.upstream,
                self._path.clock,
                idle_timeout_s=self.config.idle_timeout_s,
                on_done=functools.partial(self._relayed, conn, relay),
                up=relay.up,
                down=relay.down,
            )
        except BaseException:
            relay.upstream.close()
            raise

    def _relayed(self, conn: Conn, relay: Relay, _: Splicing, result: SpliceResult) -> None:
        """The relay ended (in the context of the connection's task: its log fields)."""
        conn.splicing = None
        relay.upstream.close()
        try:
            refused = None
            if relay.silence_is_refusal and result.down_bytes == 0:
                refused = refusal_after_handshake(relay.upstream)
            if refused is not None:  # the destination never spoke: it refused us, say why
                self._refused(conn, refused)
                return
            metrics = self._path.metrics
            metrics.listener_bytes.labels(self.name, "up").inc(result.up_bytes)
            metrics.listener_bytes.labels(self.name, "down").inc(result.down_bytes)
            metrics.listener_relays.labels(self.name, result.relay).inc()
            log.info(
                "listener.closed",
                reason=result.reason,
                device=conn.device_id,
                up_bytes=result.up_bytes,
                down_bytes=result.down_bytes,
                relay=result.relay,
            )
        finally:
            self._ended(conn)

    def _refused(self, conn: Conn, exc: Refused) -> None:
        self._path.metrics.listener_connections.labels(self.name, exc.reason).inc()
        event = "upstream.refused" if exc.upstream else "listener.refused"
        log.warning(event, reason=exc.reason, device=conn.device_id, detail=exc.detail)


def _stop(conn: Conn) -> None:
    """Cut a connection: its set-up is cancelled, or its relay ended."""
    if conn.splicing is not None:
        conn.splicing.finish("cancelled")
    elif conn.task is not None:
        conn.task.cancel()


def _take_one(counts: Counter[str], key: str) -> None:
    counts[key] -= 1
    if counts[key] <= 0:
        del counts[key]
