"""A plain TCP listener for devices on a trusted network.

Each connection: the source address names the device (identity), :func:`policy.decide` says
whether it may pass, the destination is dialled (upstream), and bytes are relayed until either
side is done. Refusals close the connection and log the reason; nobody else is affected.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
from collections.abc import Awaitable, Callable

from fleetgate.clock import Clock
from fleetgate.config.schema import ListenerConfig, split_host_port
from fleetgate.dataplane.policy import decide
from fleetgate.dataplane.relay import relay
from fleetgate.errors import FleetgateError
from fleetgate.logs import bind, get_logger
from fleetgate.metrics import Metrics
from fleetgate.records import Device

log = get_logger("fleetgate.dataplane")
_conn_ids = itertools.count(1)

DeviceLookup = Callable[[str], Awaitable[Device | None]]


class TcpListener:
    def __init__(
        self,
        name: str,
        config: ListenerConfig,
        lookup: DeviceLookup,
        metrics: Metrics,
        clock: Clock,
    ) -> None:
        self.name = name
        self.config = config
        self._lookup = lookup
        self._metrics = metrics
        self._clock = clock
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        # Relayed connections by device, with their source address: what a revocation cuts.
        self._by_device: dict[str, dict[asyncio.Task[None], str]] = {}

    @property
    def active(self) -> int:
        return len(self._connections)

    @property
    def bound_addresses(self) -> list[tuple[str, int]]:
        if self._server is None:
            return []
        return [s.getsockname()[:2] for s in self._server.sockets]

    async def start(self) -> None:
        host, port = split_host_port(self.config.bind)
        self._server = await asyncio.start_server(
            self._on_connection, host or None, port, reuse_address=True, backlog=1024
        )
        self._metrics.listener_up.labels(self.name).set(1)
        log.info("listener.bound", listener=self.name, addresses=self.bound_addresses)

    async def stop_accepting(self) -> None:
        # Closing the server stops new accepts; live connections are left to drain().
        if self._server is not None:
            self._server.close()
        with contextlib.suppress(KeyError):  # never bound
            self._metrics.listener_up.remove(self.name)

    async def drain(self, timeout_s: float) -> None:
        """Let live connections finish for up to ``timeout_s``, then cut the rest."""
        pending = set(self._connections)
        if pending:
            _, still = await asyncio.wait(pending, timeout=timeout_s)
            for task in still:
                task.cancel()
            await asyncio.gather(*still, return_exceptions=True)

    def devices_connected(self) -> set[str]:
        return set(self._by_device)

    def cut(self, device_id: str, reason: str, *, keep_sources: tuple[str, ...] = ()) -> int:
        """Close ``device_id``'s live connections (except from ``keep_sources``); how many."""
        cut = 0
        for task, source in list(self._by_device.get(device_id, {}).items()):
            if source in keep_sources:
                continue
            task.cancel()
            cut += 1
            log.warning(
                "listener.connection_cut",
                listener=self.name,
                device=device_id,
                source=source,
                reason=reason,
            )
        if cut:
            self._metrics.listener_connections.labels(self.name, f"cut_{reason}").inc(cut)
        return cut

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        conn_id = f"{self.name}-{next(_conn_ids)}"
        peer = writer.get_extra_info("peername")
        source = peer[0] if peer else "?"
        self._connections.add(task)
        with bind(listener=self.name, conn=conn_id, source=source):
            try:
                await self._serve(reader, writer, source)
            except FleetgateError as exc:
                self._metrics.listener_connections.labels(self.name, "error").inc()
                log.error("listener.connection_failed", reason=exc.kind.slug, detail=exc.detail)
            finally:
                self._connections.discard(task)
                writer.close()

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, source: str
    ) -> None:
        device = await self._lookup(source)
        # This connection is already counted in _connections.
        decision = decide(
            device, active=self.active - 1, max_connections=self.config.max_connections
        )
        if not decision.allowed:
            assert decision.refusal is not None
            self._metrics.listener_connections.labels(self.name, decision.refusal.value).inc()
            log.warning(
                "listener.refused",
                reason=decision.refusal.value,
                device=device.id if device else None,
            )
            return
        assert device is not None
        with bind(device=device.id):
            host, port = split_host_port(self.config.forward_to)
            try:
                async with asyncio.timeout(self.config.connect_timeout_s):
                    upstream = await asyncio.open_connection(host, port)
            except (OSError, TimeoutError) as exc:
                reason = "connect_timeout" if isinstance(exc, TimeoutError) else "connect_failed"
                self._metrics.listener_connections.labels(self.name, reason).inc()
                log.warning(
                    "upstream.connect_failed",
                    reason=reason,
                    destination=self.config.forward_to,
                    detail=str(exc) or type(exc).__name__,
                )
                return
            sock = upstream[1].get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._metrics.listener_connections.labels(self.name, "relayed").inc()
            self._metrics.listener_active.labels(self.name).inc()
            log.info("listener.connected", destination=self.config.forward_to)
            task = asyncio.current_task()
            assert task is not None
            self._by_device.setdefault(device.id, {})[task] = source
            try:
                stats, reason = await relay(
                    (reader, writer),
                    upstream,
                    self._clock,
                    idle_timeout_s=self.config.idle_timeout_s,
                )
            except asyncio.CancelledError:
                # Cut (revocation) or drain (shutdown): the log still says the relay ended.
                log.info("listener.closed", reason="cancelled")
                raise
            finally:
                mine = self._by_device.get(device.id, {})
                mine.pop(task, None)
                if not mine:
                    self._by_device.pop(device.id, None)
                self._metrics.listener_active.labels(self.name).dec()
                upstream[1].close()
            self._metrics.listener_bytes.labels(self.name, "up").inc(stats.up_bytes)
            self._metrics.listener_bytes.labels(self.name, "down").inc(stats.down_bytes)
            log.info(
                "listener.closed",
                reason=reason,
                up_bytes=stats.up_bytes,
                down_bytes=stats.down_bytes,
            )
