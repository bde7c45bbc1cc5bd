"""HTTP/1.1 to a destination over the gateway's verified connections, with keep-alive pooling
per (destination, client credential): a device's requests reuse its own authenticated
connections, never another device's.

An idle pooled connection is kept for IDLE_KEEP_S at most, and closed as soon as the server
ends it: a fleet of devices that each post once and go away leaves no descriptors behind (a
sweep every SWEEP_EVERY_S, while anything is pooled, closes what nobody came back for)."""

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
SWEEP_EVERY_S = IDLE_KEEP_S / 2
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
    _pool: KeptAlive
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


class KeptAlive:
    """Idle connections kept alive for the next request, per key (destination and client
    credential), newest last."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._idle: dict[tuple[object, ...], list[_Pooled]] = {}
        self._sweep: asyncio.TimerHandle | None = None

    @property
    def keys(self) -> int:
        return len(self._idle)

    def give_back(self, key: tuple[object, ...], pooled: _Pooled, *, reusable: bool) -> None:
        """Keep ``pooled`` for the next request if its exchange finished cleanly, else close it."""
        http = pooled.http
        if (
            reusable
            and http.our_state is h11.DONE
            and http.their_state is h11.DONE
            and not pooled.endpoint.is_closed
        ):
            http.start_next_cycle()
            pooled.idle_since = self._clock.monotonic()
            pooled.endpoint.on_eof = pooled.endpoint.close  # the server ended it while idle
            idle = self._idle.setdefault(key, [])
            idle.append(pooled)
            if len(idle) > MAX_IDLE_PER_KEY:
                idle.pop(0).endpoint.close()
            if self._sweep is None:
                self._sweep = asyncio.get_running_loop().call_later(SWEEP_EVERY_S, self.sweep)
            return
        pooled.endpoint.close()

    def take(self, key: tuple[object, ...]) -> _Pooled | None:
        """The newest usable idle connection for ``key``, if any."""
        idle = self._idle.get(key)
        now = self._clock.monotonic()
        found = None
        while idle and found is None:
            pooled = idle.pop()
            if self._usable_or_closed(pooled, now):
                pooled.endpoint.on_eof = None  # the exchange reads the end itself
                found = pooled
        if idle is not None and not idle:
            del self._idle[key]
        return found

    def sweep(self) -> None:
        """Close the idle connections kept too long or ended by the server, and forget the
        pools left empty (the devices that do not come back)."""
        self._sweep = None
        now = self._clock.monotonic()
        for key, idle in list(self._idle.items()):
            kept = [pooled for pooled in idle if self._usable_or_closed(pooled, now)]
            if kept:
                self._idle[key] = kept
            else:
                del self._idle[key]
        if self._idle:
            self._sweep = asyncio.get_running_loop().call_later(SWEEP_EVERY_S, self.sweep)

    @staticmethod
    def _usable_or_closed(pooled: _Pooled, now: float) -> bool:
        """Whether ``pooled`` may serve another request; if not, it is closed here."""
        endpoint = pooled.endpoint
        if endpoint.is_closed or endpoint.at_eof or now - pooled.idle_since > IDLE_KEEP_S:
            endpoint.close()
            return False
        return True

    def close(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for idle in self._idle.values():
            for pooled in idle:
                pooled.endpoint.close()
        self._idle.clear()


class HttpUpstream:
    def __init__(self, path: DataPath, clock: Clock) -> None:
        self._path = path
        self._pool = KeptAlive(clock)

    def close(self) -> None:
        self._pool.close()

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
            pooled = self._pool.take(key)
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
            event.status_code, bytes(event.reason), list(event.headers), pooled, self._pool, key
        )
