"""udp listeners: each datagram from a registered device becomes an HTTPS POST to its route's
destination (JSON: the device identity and the payload in base64, signed like any forwarded
request); a non-empty response body comes back to the device as one datagram.

UDP has no connection to refuse: datagrams from unknown or disabled devices, or beyond
``max_in_flight`` outstanding requests, are dropped, counted and logged.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json

import h11

from fleetgate.config.schema import ListenerConfig, split_host_port
from fleetgate.dataplane.affinity import PortSharing
from fleetgate.dataplane.datapath import DataPath, Refused
from fleetgate.dataplane.http_upstream import HttpUpstream
from fleetgate.dataplane.listener import ListenerLoad
from fleetgate.dataplane.proxy_http import build_request
from fleetgate.logs import bind, get_logger
from fleetgate.records import Device

log = get_logger("fleetgate.dataplane")
MAX_DATAGRAM = 65_507  # IPv4 UDP payload limit
JSON = b"application/json"


class _Receiver(asyncio.DatagramProtocol):
    def __init__(self, listener: UdpListener) -> None:
        self._listener = listener

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        self._listener.received(data, (str(addr[0]), int(str(addr[1]))))


class UdpListener:
    def __init__(
        self,
        name: str,
        config: ListenerConfig,
        path: DataPath,
        http: HttpUpstream,
        *,
        sharing: PortSharing | None,
        load: ListenerLoad | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self._path = path
        self._http = http
        self._sharing = sharing
        self._transport: asyncio.DatagramTransport | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # Requests in flight (``connections``), with those of instances a reload retired.
        self.load = load if load is not None else ListenerLoad()

    @property
    def active(self) -> int:
        return len(self._tasks)

    @property
    def bound_addresses(self) -> list[tuple[str, int]]:
        if self._transport is None:
            return []
        return [self._transport.get_extra_info("sockname")[:2]]

    async def start(self) -> None:
        host, port = split_host_port(self.config.bind)
        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.create_datagram_endpoint(
            lambda: _Receiver(self),
            local_addr=(host or "0.0.0.0", port),  # noqa: S104 - the operator's bind
            reuse_port=self._sharing is not None or None,
        )
        if self._sharing is not None:
            self._sharing.steer(self._transport.get_extra_info("socket"))
        self._path.metrics.listener_up.labels(self.name).set(1)
        log.info("listener.bound", listener=self.name, addresses=self.bound_addresses)

    async def stop_accepting(self) -> None:
        if self._transport is not None:
            self._transport.close()
        with contextlib.suppress(KeyError):
            self._path.metrics.listener_up.remove(self.name)

    async def drain(self, timeout_s: float) -> None:
        pending = set(self._tasks)
        if pending:
            _, still = await asyncio.wait(pending, timeout=timeout_s)
            for task in still:
                task.cancel()
            await asyncio.gather(*still, return_exceptions=True)

    def devices_connected(self) -> set[str]:
        return set()  # nothing stays connected

    def cut(
        self,
        device_id: str,
        reason: str,
        *,
        keep_sources: tuple[str, ...] | None = None,
        credential: str | None = None,
    ) -> int:
        return 0

    def cut_certificate(self, serial: str) -> list[str]:
        return []

    def received(self, data: bytes, addr: tuple[str, int]) -> None:
        metrics = self._path.metrics
        if self.load.connections >= self.config.max_in_flight:
            metrics.listener_connections.labels(self.name, "overloaded").inc()
            log.warning("listener.refused", listener=self.name, source=addr[0], reason="overloaded")
            return
        task = asyncio.get_running_loop().create_task(self._forward(data, addr))
        self._tasks.add(task)
        self.load.connections += 1
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        """Forget a datagram's task; an exception nobody expected is logged and counted, not
        left to asyncio's "exception was never retrieved"."""
        self._tasks.discard(task)
        self.load.connections -= 1
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        self._path.metrics.listener_connections.labels(self.name, "internal_error").inc()
        log.error(
            "udp.failed",
            listener=self.name,
            reason="internal_error",
            detail=f"{type(exc).__name__}: {exc}"[:500],
        )

    async def _forward(self, data: bytes, addr: tuple[str, int]) -> None:
        metrics = self._path.metrics
        device_id: str | None = None  # once known, on every event of this datagram
        with bind(listener=self.name, source=addr[0]):
            try:
                device = await self._path.by_source(addr[0])
                device_id = device.id
                with bind(device=device.id):
                    await self._exchange(device, data, addr)
            except Refused as exc:
                metrics.listener_connections.labels(self.name, exc.reason).inc()
                event = "upstream.refused" if exc.upstream else "listener.refused"
                log.warning(event, reason=exc.reason, device=device_id, detail=exc.detail)
            except TimeoutError:
                metrics.listener_connections.labels(self.name, "response_timeout").inc()
                log.warning(
                    "upstream.refused",
                    reason="response_timeout",
                    device=device_id,
                    detail="the answer stopped arriving",
                )
            except (ConnectionError, OSError, h11.RemoteProtocolError) as exc:
                metrics.listener_connections.labels(self.name, "connection_lost").inc()
                log.warning(
                    "upstream.refused", reason="connection_lost", device=device_id, detail=str(exc)
                )

    async def _exchange(self, device: Device, data: bytes, addr: tuple[str, int]) -> None:
        """POST one datagram for ``device``; send a 2xx answer's body back to ``addr``."""
        metrics = self._path.metrics
        body = json.dumps(
            {
                "device_id": device.id,
                "group": device.group,
                "source": f"{addr[0]}:{addr[1]}",
                "received_at": self._path.clock.now().isoformat(),
                "payload": base64.b64encode(data).decode(),
            }
        ).encode()
        route = await self._path.route(self.name, self.config, device)
        request = await build_request(
            self._path,
            route,
            self.config,
            addr[0],
            device,
            h11.Request(
                method="POST",
                target=route.destination.udp_path,
                # h11 wants a Host on any HTTP/1.1 request; build_request puts the
                # destination's own in its place.
                headers=[(b"host", b"fleetgate"), (b"content-type", JSON)],
            ),
            body,
        )
        response = await self._http.exchange(device, route, request, body)
        try:
            answer = bytearray()
            async for chunk in response.body(route.destination.response_timeout_s):
                answer += chunk
                if len(answer) > MAX_DATAGRAM:
                    raise Refused("answer_too_large", f"over {MAX_DATAGRAM} bytes", upstream=True)
        finally:
            response.release()
        metrics.listener_connections.labels(self.name, "relayed").inc()
        metrics.listener_bytes.labels(self.name, "up").inc(len(data))
        metrics.listener_bytes.labels(self.name, "down").inc(len(answer))
        log.info("udp.forwarded", status=response.status, answer_bytes=len(answer))
        if answer and self._transport is not None and 200 <= response.status < 300:
            self._transport.sendto(bytes(answer), addr)
