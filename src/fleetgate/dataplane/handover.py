"""A spliced connection handed over to the tunnel core (``_tunnel``, C) for its relaying.

The gateway sets a connection up in Python: it reads the device's first packet, identifies it,
chooses the route, dials the destination with the device's credential and runs the TLS
handshake. From then on, when nothing is rewritten, the two sockets only move bytes: the splice
hands them to the event loop's tunnel core (:func:`take`), which relays them as it relays
``fleetgate connect``'s (edge-triggered, back-pressure, half-closes, OpenSSL's record buffers
given back when quiet, idle timeout) with no Python frame and no event-loop transport per
connection. Python hears of the connection again once, at its end (:class:`Handover`'s
``on_end``), and can end it early (:meth:`Handover.cut`: a revoked credential, a drain).

What is handed over: the device's socket (plain, or with its TLS server side when the listener
terminates TLS: tls, mtls, psk) and the destination's socket with its ``SSL`` (the
``ssl.SSLObject`` objects stay alive, and the destination's session hooks run after the core's first
reads, so its session is still kept for the next connections). The asyncio transports let go
of their sockets without closing the connections (the core has its own descriptors for them).
Anything else (two plain ends, bytes a transport has not sent yet, an end already half-closed)
stays with the splice and the compiled relay (``fastpath``).

Where the tunnel core is not built or ``FLEETGATE_RELAY=python`` is set, nothing is handed over.
"""

from __future__ import annotations

import asyncio
import errno
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from fleetgate.clock import Clock, SystemClock
from fleetgate.dataplane import native, tunnel
from fleetgate.dataplane.endpoint import Endpoint, PlainEndpoint
from fleetgate.dataplane.tls_endpoint import TlsEndpoint, TlsFailure, reset_after_handshake
from fleetgate.logs import get_logger

log = get_logger("fleetgate.dataplane")

AVAILABLE = tunnel.AVAILABLE
ENABLED = AVAILABLE  # tests switch it off to exercise the compiled relay on transports
TICK_S = tunnel.TICK_S


@dataclass(frozen=True)
class Outcome:
    """How a handed-over connection ended (``reason`` as the splice names it)."""

    reason: str
    up_bytes: int
    down_bytes: int
    failure: TlsFailure | None  # the destination's TLS alert, if that is how it ended


_RESET = os.strerror(errno.ECONNRESET)  # how the core words a reset (strerror)


class _Released(asyncio.Protocol):
    """What a transport reports to once its socket went to the core: nothing is listening."""


_RELEASED = _Released()


class _LoopCore:
    """The tunnel core of one event loop and clock: the loop watches its descriptor, and a
    timer (only while it holds connections, or has memory of ended ones to give back) ends
    those idle too long.

    The loop holds it (through its reader) and it holds what its connections' callbacks hold
    (futures of the loop, among others): a cycle the collector frees with the loop. Only weak
    references to it are kept elsewhere (``_cores``), or the loop would live forever."""

    def __init__(self, clock: Clock) -> None:
        assert tunnel._tunnel is not None
        self.clock = clock
        monotonic = None if type(clock) is SystemClock else clock.monotonic
        self.core = tunnel._tunnel.Core(
            None, 0, None, False, None, False, 0.0, 0.0, self._no_listener, monotonic
        )
        asyncio.get_running_loop().add_reader(self.core.fileno(), tunnel.run_on_loop, self.core)
        self._tick: asyncio.TimerHandle | None = None

    @staticmethod
    def _no_listener(*_: object) -> None:
        """(The core accepts nothing itself: only adopted connections, each with its own.)"""

    def adopted(self) -> None:
        if self._tick is None:
            self._tick = asyncio.get_running_loop().call_later(TICK_S, self._expire)

    def _expire(self) -> None:
        self._tick = None
        try:
            self.core.expire()
        finally:
            if self.core.count or self.core.trim_due:
                self._tick = asyncio.get_running_loop().call_later(TICK_S, self._expire)


_cores: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[int, weakref.ref[_LoopCore]]] = (
    weakref.WeakKeyDictionary()
)


def _loop_core(clock: Clock) -> _LoopCore:
    per_clock = _cores.setdefault(asyncio.get_running_loop(), {})
    held = per_clock.get(id(clock))
    found = held() if held is not None else None
    if found is None or found.clock is not clock:
        found = _LoopCore(clock)
        per_clock[id(clock)] = weakref.ref(found)
    return found


def check_timeouts(clock: Clock) -> None:
    """End the running loop's handed-over connections on ``clock`` that are past their idle
    timeout now (its timer does this every :data:`TICK_S`)."""
    _loop_core(clock).core.expire()


class Handover:
    """One connection the core relays: ``on_end`` gets its :class:`Outcome`, once."""

    __slots__ = ("_key", "_on_end", "_owner", "_received", "destination", "device")

    def __init__(
        self,
        owner: _LoopCore,
        device: Endpoint,
        destination: TlsEndpoint,
        on_end: Callable[[Outcome], None],
    ) -> None:
        self._owner: _LoopCore | None = owner
        self._key = 0
        self._on_end: Callable[[Outcome], None] | None = on_end
        self.device = device
        self.destination = destination
        self._received = destination.received  # before the core's reads

    def cut(self, reason: str) -> None:
        """End it now: the device gets a reset, the destination no close_notify (the stream
        was cut, not complete)."""
        if self._owner is not None and self._on_end is not None:
            self._owner.core.cut(self._key, reason)

    def _ended(
        self,
        outcome: str,
        source: str,
        verify_code: int,
        reason: str,
        detail: str,
        up_bytes: int,
        down_bytes: int,
    ) -> None:
        on_end, self._on_end, self._owner = self._on_end, None, None
        failure = None
        try:
            failure = self._account(outcome, verify_code, reason, detail, up_bytes, down_bytes)
        finally:  # whatever happened above, the splice hears of its end
            if on_end is not None:
                on_end(Outcome(outcome, up_bytes, down_bytes, failure))

    def _account(
        self,
        outcome: str,
        verify_code: int,
        reason: str,
        detail: str,
        up_bytes: int,
        down_bytes: int,
    ) -> TlsFailure | None:
        """The endpoints' counters and state, as if they had relayed it themselves; the
        destination's failure, if that is how it ended."""
        for endpoint in (self.device, self.destination):
            endpoint.ended_elsewhere()
        self.device.received += up_bytes
        self.destination.sent += up_bytes
        self.destination.received = self._received + down_bytes
        self.device.sent += down_bytes
        cause = tunnel._cause(outcome, verify_code, reason)
        failure = None
        if outcome == "destination_lost" and cause not in ("", "tls_error"):
            failure = TlsFailure(cause, detail)  # an alert: a refused certificate, say
        elif outcome == "destination_lost" and detail == _RESET and not self.destination.received:
            failure = reset_after_handshake()
        if failure is not None:
            self.destination.failure = failure
        return failure

    def _after_read(self, down_bytes: int) -> bool:
        self.destination.received = self._received + down_bytes  # what its hooks look at
        return self.destination.run_read_hooks()


def _socket_fd(endpoint: Endpoint) -> int:
    transport = endpoint.transport
    if transport is None:
        return -1
    sock = transport.get_extra_info("socket")
    return sock.fileno() if sock is not None else -1


def _reads_the_standard_way(device: Endpoint) -> bool:
    """A plain device, or a TLS device whose handshake is done (the server side)."""
    if isinstance(device, TlsEndpoint):
        return device.can_hand_over(server_side=True)
    return type(device).data_received is PlainEndpoint.data_received


def _can_hand_over(device: Endpoint, destination: TlsEndpoint) -> bool:
    if not ENABLED or not _reads_the_standard_way(device) or not destination.can_hand_over():
        return False
    for endpoint in (device, destination):
        transport = endpoint.transport
        if transport is None or transport.is_closing() or endpoint.is_closed or endpoint.at_eof:
            return False
        if transport.get_write_buffer_size() or _socket_fd(endpoint) < 0:
            return False  # bytes the transport still owes the socket: it keeps the socket
    return True


def take(
    device: Endpoint,
    destination: Endpoint,
    clock: Clock,
    *,
    source: str,
    idle_timeout_s: float,
    on_end: Callable[[Outcome], None],
) -> Handover | None:
    """Hand both sockets to the loop's tunnel core, if they can be; None (nothing changed)
    otherwise. Call with nothing buffered on either endpoint (the splice sent it on)."""
    if not isinstance(destination, TlsEndpoint):
        return None
    for tls in (device, destination):
        if isinstance(tls, TlsEndpoint):
            tls.flush()  # the last handshake flight, if it is still in OpenSSL's hands
    if not _can_hand_over(device, destination):
        return None
    descriptors: list[int] = []
    try:  # out of descriptors (EMFILE), say: the transports keep the connection
        owner = _loop_core(clock)
        descriptors.append(os.dup(_socket_fd(device)))
        descriptors.append(os.dup(_socket_fd(destination)))
    except OSError as exc:
        for fd in descriptors:
            os.close(fd)
        log.warning("handover.failed", detail=str(exc))
        return None
    device_fd, upstream_fd = descriptors
    handover = Handover(owner, device, destination, on_end)
    ssl_object = destination.ssl_object
    device_ssl = device.ssl_object if isinstance(device, TlsEndpoint) else None
    hooks = None if destination.run_read_hooks() else handover._after_read
    try:
        handover._key = owner.core.adopt(
            device_fd,
            upstream_fd,
            (ssl_object, device_ssl),  # kept alive while the core uses them
            native.ssl_address(ssl_object),
            source,
            idle_timeout_s,
            handover._ended,
            hooks,
            native.ssl_address(device_ssl) if device_ssl is not None else 0,
        )
    except BaseException as exc:  # the descriptors are still ours
        os.close(device_fd)
        os.close(upstream_fd)
        if not isinstance(exc, (OSError, ValueError, MemoryError)):
            raise
        log.warning("handover.failed", detail=str(exc))
        return None
    owner.adopted()
    for endpoint in (device, destination):
        transport = endpoint.transport
        assert transport is not None
        transport.set_protocol(_RELEASED)
        transport.abort()  # its descriptor closes; the connection stays, on the core's
        endpoint.transport = None
    return handover
