"""HTTP/1.1 to a destination over the gateway's verified connections, with keep-alive pooling
per (destination, client credential): a device's requests reuse its own authenticated
connections, never another device's."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import h11

from fleetgate.clock import Clock
from fleetgate.dataplane.datapath import DataPath, Refused, Route, refusal_after_handshake
from fleetgate.dataplane.endpoint import Endpoint
from fleetgate.records import Device

MAX_IDLE_PER_KEY = 8
IDLE_KEEP_S = 30.0
MAX_RESPONSE_HEADER_BYTES = 64 * 1024
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"PUT", b"DELETE", b"OPTIONS"})
# Headers that belong to one hop (RFC 9110 section 7.6.1) and never pass through.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)


async def next_event(conn: h11.Connection, endpoint: Endpoint) -> h11.Event | type[h11.PAUSED]:
    """The next h11 event, reading from ``endpoint`` as needed (EOF included)."""
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event  # type: ignore[return-value]
        conn.receive_data(await endpoint.read_some())


def strip_hop_by_hop(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    named = {
        token.strip().lower()
        for name, value in headers
        if name == b"connection"
        for token in value.split(b",")
    }
    return [(n, v) for n, v in headers if n not in HOP_BY_HOP and n not in named]


@dataclass
class _Pooled:
    endpoint: Endpoint
    http: h11.Connection
    idle_since: float = 0.0


@dataclass
class UpstreamResponse:
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    _pooled: _Pooled
    _pool: HttpUpstream
    _key: tuple[object, ...]
    _done: bool = field(default=False)

    async def body(self, timeout_s: float) -> AsyncIterator[bytes]:
        """The body as it arrives (each chunk within ``timeout_s`` of the previous)."""
        while True:
            async with asyncio.timeout(timeout_s):
                event = await next_event(self._pooled.http, self._pooled.endpoint)
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self._done = True
                return
            else:
                raise ConnectionError(f"upstream ended the response early ({type(event).__name__})")

    def release(self) -> None:
        """Return the connection to the pool if the exchange finished cleanly, else close it."""
        self._pool.give_back(self._key, self._pooled, reusable=self._done)


class HttpUpstream:
    def __init__(self, path: DataPath, clock: Clock) -> None:
        self._path = path
        self._clock = clock
        self._idle: dict[tuple[object, ...], list[_Pooled]] = {}

    def give_back(self, key: tuple[object, ...], pooled: _Pooled, *, reusable: bool) -> None:
        http = pooled.http
        if (
            reusable
            and http.our_state is h11.DONE
            and http.their_state is h11.DONE
            and not pooled.endpoint.is_closed
        ):
            http.start_next_cycle()
            pooled.idle_since = self._clock.monotonic()
            idle = self._idle.setdefault(key, [])
            idle.append(pooled)
            if len(idle) > MAX_IDLE_PER_KEY:
                idle.pop(0).endpoint.close()
            return
        pooled.endpoint.close()

    def _take_idle(self, key: tuple[object, ...]) -> _Pooled | None:
        idle = self._idle.get(key)
        now = self._clock.monotonic()
        while idle:
            pooled = idle.pop()
            if pooled.endpoint.is_closed or pooled.endpoint.at_eof:
                continue
            if now - pooled.idle_since > IDLE_KEEP_S:
                pooled.endpoint.close()
                continue
            return pooled
        return None

    def close(self) -> None:
        for idle in self._idle.values():
            for pooled in idle:
                pooled.endpoint.close()
        self._idle.clear()

    async def exchange(
        self,
        device: Device,
        route: Route,
        request: h11.Request,
        body: bytes,
    ) -> UpstreamResponse:
        """Send a request (whole body known) and read the response head."""
        client = await self._path.client_certificate(device, route.destination)
        key: tuple[object, ...] = (route.name, route.destination, client.key_id if client else "")
        for attempt in (1, 2):
            pooled = self._take_idle(key)
            reused = pooled is not None
            if pooled is None:
                try:
                    endpoint = await self._path.upstream.connect(
                        route.name, route.destination, client
                    )
                except ConnectionError as exc:
                    cause = getattr(exc, "cause", "connect_failed")
                    raise Refused(cause, getattr(exc, "detail", str(exc)), upstream=True) from None
                pooled = _Pooled(endpoint, h11.Connection(h11.CLIENT, MAX_RESPONSE_HEADER_BYTES))
            try:
                return await self._send(key, pooled, request, body, route)
            except (ConnectionError, h11.RemoteProtocolError) as exc:
                pooled.endpoint.close()
                refused = refusal_after_handshake(pooled.endpoint)
                if refused is not None:
                    raise refused from None
                # A kept-alive connection the server had already closed: try a fresh one once,
                # for requests that are safe to repeat.
                if reused and attempt == 1 and request.method in IDEMPOTENT:
                    continue
                raise Refused("upstream_protocol", str(exc), upstream=True) from None
            except TimeoutError:
                pooled.endpoint.close()
                raise Refused(
                    "response_timeout",
                    f"no answer within {route.destination.response_timeout_s} s",
                    upstream=True,
                ) from None
        raise AssertionError("unreachable")

    async def _send(
        self,
        key: tuple[object, ...],
        pooled: _Pooled,
        request: h11.Request,
        body: bytes,
        route: Route,
    ) -> UpstreamResponse:
        http, endpoint = pooled.http, pooled.endpoint
        data = http.send(request) or b""
        if body:
            data += http.send(h11.Data(data=body)) or b""
        data += http.send(h11.EndOfMessage()) or b""
        endpoint.write(data)
        async with asyncio.timeout(route.destination.response_timeout_s):
            while True:
                event = await next_event(http, endpoint)
                if isinstance(event, h11.InformationalResponse):
                    continue
                if isinstance(event, h11.Response):
                    break
                raise ConnectionError(f"no response ({type(event).__name__})")
        return UpstreamResponse(
            event.status_code, bytes(event.reason), list(event.headers), pooled, self, key
        )
