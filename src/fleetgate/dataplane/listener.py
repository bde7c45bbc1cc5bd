"""A device-facing stream listener (tcp, mqtt, http): accept, hand each connection to its
protocol's handler, account for it, and cut it when the registry no longer allows it.

Handlers (``proxy_tcp``, ``proxy_mqtt``, ``proxy_http``) read what they need from the device,
resolve the device and its route through the :class:`DataPath`, and splice or proxy. A refusal
is answered in the device's protocol by the handler and logged here with its reason; nobody else
is affected.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from fleetgate.config.schema import ListenerConfig, split_host_port
from fleetgate.dataplane.datapath import DataPath, Refused
from fleetgate.dataplane.endpoint import PlainEndpoint
from fleetgate.dataplane.splice import SpliceResult
from fleetgate.logs import bind, get_logger

log = get_logger("fleetgate.dataplane")
_conn_ids = itertools.count(1)


@dataclass
class Conn:
    """One accepted device connection, as handlers see it."""

    id: str
    listener: str
    config: ListenerConfig
    endpoint: PlainEndpoint
    source: str
    path: DataPath
    device_id: str | None = None
    on_device: Callable[[Conn, str], None] = field(default=lambda conn, device: None)

    def connected(self, destination: str, **fields: object) -> None:
        """The destination accepted: from here on bytes are relayed."""
        self.path.metrics.listener_connections.labels(self.listener, "relayed").inc()
        log.info("listener.connected", destination=destination, **fields)

    def identified(self, device_id: str) -> None:
        """The handler knows the device: from now on a revocation can cut this connection."""
        self.device_id = device_id
        self.on_device(self, device_id)


Handler = Callable[[Conn], Awaitable[SpliceResult | None]]


class _Accepted(PlainEndpoint):
    def __init__(self, on_made: Callable[[_Accepted], None]) -> None:
        super().__init__()
        self._on_made = on_made

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._on_made(self)


class StreamListener:
    def __init__(
        self,
        name: str,
        config: ListenerConfig,
        path: DataPath,
        handler: Handler,
        *,
        reuse_port: bool,
    ) -> None:
        self.name = name
        self.config = config
        self._path = path
        self._handler = handler
        self._reuse_port = reuse_port
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # Connections by device, with their source address: what a revocation cuts.
        self._by_device: dict[str, dict[asyncio.Task[None], str]] = {}

    @property
    def active(self) -> int:
        return len(self._tasks)

    @property
    def bound_addresses(self) -> list[tuple[str, int]]:
        if self._server is None:
            return []
        return [s.getsockname()[:2] for s in self._server.sockets]

    async def start(self) -> None:
        host, port = split_host_port(self.config.bind)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Accepted(self._accepted),
            host or None,
            port,
            reuse_address=True,
            reuse_port=self._reuse_port or None,
            backlog=4096,
        )
        self._path.metrics.listener_up.labels(self.name).set(1)
        log.info("listener.bound", listener=self.name, addresses=self.bound_addresses)

    async def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()
        with contextlib.suppress(KeyError):
            self._path.metrics.listener_up.remove(self.name)

    async def drain(self, timeout_s: float) -> None:
        """Let live connections finish for up to ``timeout_s``, then cut the rest."""
        pending = set(self._tasks)
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
            self._path.metrics.listener_connections.labels(self.name, f"cut_{reason}").inc(cut)
        return cut

    # -- one connection ---------------------------------------------------------------------------

    def _accepted(self, endpoint: _Accepted) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(endpoint))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _register(self, conn: Conn, device_id: str) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._by_device.setdefault(device_id, {})[task] = conn.source

    def _unregister(self, conn: Conn) -> None:
        task = asyncio.current_task()
        if conn.device_id is None or task is None:
            return
        mine = self._by_device.get(conn.device_id, {})
        mine.pop(task, None)
        if not mine:
            self._by_device.pop(conn.device_id, None)

    async def _serve(self, endpoint: _Accepted) -> None:
        peer = endpoint.peer_address()
        source = peer[0] if peer else "?"
        conn = Conn(
            id=f"{self.name}-{next(_conn_ids)}",
            listener=self.name,
            config=self.config,
            endpoint=endpoint,
            source=source,
            path=self._path,
            on_device=self._register,
        )
        metrics = self._path.metrics
        with bind(listener=self.name, conn=conn.id, source=source):
            if self.active > self.config.max_connections:
                metrics.listener_connections.labels(self.name, "listener_full").inc()
                log.warning("listener.refused", reason="listener_full")
                endpoint.abort()
                return
            metrics.listener_active.labels(self.name).inc()
            try:
                result = await self._handler(conn)
            except Refused as exc:
                metrics.listener_connections.labels(self.name, exc.reason).inc()
                event = "upstream.refused" if exc.upstream else "listener.refused"
                log.warning(event, reason=exc.reason, device=conn.device_id, detail=exc.detail)
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
            else:
                if result is not None:
                    metrics.listener_bytes.labels(self.name, "up").inc(result.up_bytes)
                    metrics.listener_bytes.labels(self.name, "down").inc(result.down_bytes)
                    log.info(
                        "listener.closed",
                        reason=result.reason,
                        device=conn.device_id,
                        up_bytes=result.up_bytes,
                        down_bytes=result.down_bytes,
                    )
            finally:
                metrics.listener_active.labels(self.name).dec()
                self._unregister(conn)
                endpoint.close()
