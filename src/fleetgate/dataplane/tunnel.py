"""Whole connections in C (``_tunnel``): what ``fleetgate connect`` runs when it is built.

A relay to one destination with no per-connection work above it needs Python for nothing
between accept and close. The tunnel core accepts, connects, runs the TLS handshake (the
context, the trust, the name checked and the chain cache are the same as the splice's:
:func:`~fleetgate.dataplane.upstream.build_context`,
:class:`~fleetgate.dataplane.chain_cache.VerifiedChains`), presents the client certificate,
resumes the destination's last session, and relays both ways with back-pressure and
half-closes. Python hears of a connection once, when it ends (:class:`Ended`), to log and count
it. Where it is not built (no C compiler), or ``FLEETGATE_RELAY=python`` is set, or OpenSSL is
not reachable (:mod:`~fleetgate.dataplane.native`), the same relay runs on asyncio endpoints
and the splice.

The core watches its own epoll descriptor. ``fleetgate connect`` lets it wait on that
descriptor itself (:meth:`Tunnel.serve_until`: the thread's only loop, one system call per
wake-up); embedded in an asyncio program (the tests), the event loop watches the descriptor
and calls the core when it has events (:meth:`Tunnel.start`). Either way it is called twice a
second for timeouts (:meth:`Tunnel.tick`). The destination's name is looked up at start and
again every :data:`RESOLVE_EVERY_S`, in a thread, so a slow resolver never stalls the relay.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

from fleetgate.clock import Clock, SystemClock
from fleetgate.config.schema import DestinationConfig, split_host_port
from fleetgate.dataplane import native
from fleetgate.dataplane.chain_cache import PIN_MISMATCH, VerifiedChains
from fleetgate.dataplane.tls_endpoint import cause_of_failure
from fleetgate.dataplane.upstream import ClientCertificate, build_context
from fleetgate.logs import get_logger

if TYPE_CHECKING:
    from fleetgate.dataplane._tunnel import Core

log = get_logger("fleetgate.tunnel")

RESOLVE_EVERY_S = 30.0
RESOLVE_RETRY_S = 5.0  # after a look-up failed
TICK_S = 0.5  # timeouts, idle buffers given back, the name looked up again

# How a connection ended, as the core names it: relayed (then ended), or refused while being set
# up (the device never got a byte from the destination).
RELAYED = frozenset({"closed", "idle_timeout", "device_lost", "destination_lost", "shutdown"})
REFUSED = frozenset({"connect_failed", "connect_timeout", "handshake_failed", "tls_setup"})


def _load() -> tuple[ModuleType | None, str]:
    if os.environ.get("FLEETGATE_RELAY", "") == "python":
        return None, "FLEETGATE_RELAY=python"
    try:
        from fleetgate.dataplane import _tunnel
    except ImportError as exc:
        return None, f"the tunnel core is not built ({exc})"
    if not native.AVAILABLE:
        return None, f"OpenSSL is not reachable: {native.WHY_NOT}"
    try:
        _tunnel.bind(*native.tunnel_entry_points())
    except (RuntimeError, ValueError, TypeError) as exc:
        return None, f"OpenSSL's entry points: {exc}"
    _tunnel.allow_freeing_buffers(native.FREE_BUFFERS)
    return _tunnel, ""


_tunnel, WHY_NOT = _load()
AVAILABLE = _tunnel is not None


@dataclass(frozen=True)
class Ended:
    """One connection, at its end. ``outcome`` is one of :data:`RELAYED` (``cause`` empty, or
    a TLS alert's) or :data:`REFUSED` (``cause`` says why, as the splice's refusals do)."""

    outcome: str
    source: str
    cause: str
    detail: str
    up_bytes: int
    down_bytes: int

    @property
    def refused(self) -> bool:
        return self.outcome in REFUSED


# OpenSSL 3.2 and later word an alert's reason "ssl/tls alert bad certificate" where 3.0 said
# "sslv3 alert bad certificate" or "tlsv1 alert unknown ca": the names the causes are keyed on.
_ALERT_PREFIXES = ("SSLV3_ALERT_", "TLSV1_ALERT_", "TLSV13_ALERT_")


def _reason_cause(reason: str) -> str:
    cause = cause_of_failure(0, reason)
    if cause == "tls_error" and reason.startswith("SSL/TLS_ALERT_"):
        rest = reason.removeprefix("SSL/TLS_ALERT_")
        for prefix in _ALERT_PREFIXES:
            if (named := cause_of_failure(0, prefix + rest)) != "tls_error":
                return named
    return cause


def _cause(outcome: str, verify_code: int, reason: str) -> str:
    if outcome == "handshake_failed":
        if verify_code == PIN_MISMATCH:
            return "pin_mismatch"
        if not verify_code and not reason:  # closed or reset under the handshake
            return "connection_lost"
        return cause_of_failure(verify_code, "") if verify_code else _reason_cause(reason)
    if outcome in ("connect_failed", "connect_timeout", "tls_setup"):
        return outcome
    return _reason_cause(reason) if reason else ""


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class Tunnel:
    """Connections accepted from :meth:`listen`'s sockets, relayed to one destination."""

    def __init__(
        self,
        destination: DestinationConfig,
        client: ClientCertificate | None,
        clock: Clock,
        *,
        idle_timeout_s: float,
        on_end: Callable[[Ended], None],
        turn_chunks: int = 16,
    ) -> None:
        assert _tunnel is not None, WHY_NOT
        self._destination = destination
        self._host, self._port = split_host_port(destination.address)
        self._host_is_ip = _is_ip(self._host)
        self._on_end = on_end
        server_name = destination.server_name or self._host
        context = build_context(destination, None)
        # The core's connections have no Python object for the ssl module's callbacks to find.
        if context.keylog_filename is not None:
            raise ValueError("the tunnel core cannot log TLS keys")
        self.chains: VerifiedChains = VerifiedChains(
            clock, frozenset(destination.pin_sha256), server_name
        )
        native.hook_verification(context, self.chains)
        identity = native.ClientIdentity(client.chain_pem, client.key.reveal()) if client else None
        monotonic = None if type(clock) is SystemClock else clock.monotonic
        self._core: Core = _tunnel.Core(
            context,
            native.context_address(context),
            server_name,
            _is_ip(server_name),
            identity,
            destination.session_resumption,
            destination.connect_timeout_s,
            idle_timeout_s,
            self._ended,
            monotonic,
            turn_chunks,
        )
        self._sockets: list[socket.socket] = []
        self._clock: Clock = clock
        self._tick: asyncio.TimerHandle | None = None  # on an event loop: the next tick
        self._watched: bool = False  # on an event loop: its reader is the core's descriptor
        self._next_resolve: float = 0.0
        self._resolver: threading.Thread | None = None
        self._found: list[str] | None = None  # what the resolver thread found, not yet used

    @property
    def connections(self) -> int:
        """Connections being set up or relayed."""
        return int(self._core.count)

    @property
    def resting(self) -> int:
        """Connections quiet for a while, whose OpenSSL record buffers were given back."""
        return int(self._core.resting)

    @property
    def trims(self) -> int:
        """How often the memory of a burst of connections went back to the system."""
        return int(self._core.trims)

    @property
    def turns_posted(self) -> int:
        """How often a direction used up its turn (``turn_chunks`` chunks of up to 256 KiB)
        with more to read, and let the other connections go first."""
        return int(self._core.turns_posted)

    def listen(self, sock: socket.socket) -> None:
        """Accept from ``sock`` (bound, listening); the tunnel closes it at :meth:`close`."""
        sock.setblocking(False)
        self._core.listen(sock)
        self._sockets.append(sock)

    def resolve(self) -> None:
        """Look the destination's name up now (blocking). If that fails, connections are
        refused (``connect_failed``) until a later look-up, every tick, succeeds."""
        self._next_resolve = self._clock.monotonic() + RESOLVE_EVERY_S
        try:
            self._core.set_destination(self._lookup(), self._port)
        except OSError as exc:
            self._next_resolve = self._clock.monotonic() + RESOLVE_RETRY_S
            log.warning("tunnel.resolve_failed", host=self._host, detail=str(exc))

    def _lookup(self) -> list[str]:
        """The destination's addresses, in the resolver's order (each is tried in turn); an
        IPv6 address with a zone (``fe80::1%eth0``) is left out."""
        found = socket.getaddrinfo(self._host, self._port, type=socket.SOCK_STREAM)
        addresses = list(dict.fromkeys(str(entry[4][0]) for entry in found))
        usable = [address for address in addresses if "%" not in address]
        if not usable:
            raise OSError(f"{self._host}: no usable address")
        return usable

    def _lookup_in_background(self) -> None:
        try:
            self._found = self._lookup()
        except OSError as exc:  # keep the addresses it had
            self._next_resolve = self._clock.monotonic() + RESOLVE_RETRY_S
            log.warning("tunnel.resolve_failed", host=self._host, detail=str(exc))

    # -- two ways to run: the thread's only loop, or on an asyncio event loop ------------------

    def serve_until(self, stopped: Callable[[], bool]) -> None:
        """Serve in this thread, with no event loop: the core waits on its own descriptor.
        ``stopped`` is asked after each signal and at least once a second. :meth:`resolve`
        first."""
        try:
            while not stopped():
                self._core.serve(TICK_S)
                self.tick()
        finally:
            self.close()

    async def start(self) -> None:
        """Look the destination up, then serve on the running loop until :meth:`close`."""
        await asyncio.to_thread(self.resolve)
        loop = asyncio.get_running_loop()
        loop.add_reader(self._core.fileno(), run_on_loop, self._core)
        self._watched = True
        self._tick = loop.call_later(TICK_S, self._tick_on_loop)

    def _tick_on_loop(self) -> None:
        self.tick()
        self._tick = asyncio.get_running_loop().call_later(TICK_S, self._tick_on_loop)

    def tick(self) -> None:
        """Every TICK_S: timeouts, and the destination's name looked up again when due."""
        self.check_timeouts()
        found, self._found = self._found, None
        if found is not None:
            self._core.set_destination(found, self._port)
        now = self._clock.monotonic()
        if self._host_is_ip:
            return  # an address: nothing to look up again, and no thread
        if now >= self._next_resolve and not (self._resolver and self._resolver.is_alive()):
            self._next_resolve = now + RESOLVE_EVERY_S
            self._resolver = threading.Thread(
                target=self._lookup_in_background, name="tunnel-resolver", daemon=True
            )
            self._resolver.start()

    def check_timeouts(self) -> None:
        """End the connections past their connect or idle timeout (by the tunnel's clock)."""
        self._core.expire()

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
        if outcome == "accept_failed":
            log.warning("tunnel.accept_paused", detail=detail)
            return
        if outcome == "handshake_failed" and verify_code not in (0, PIN_MISMATCH):
            detail = native.verify_message(verify_code) or detail
        elif outcome == "handshake_failed" and verify_code == PIN_MISMATCH:
            detail = "no certificate of the verified chain has a pinned key"
        cause = _cause(outcome, verify_code, reason)
        if outcome == "destination_lost" and down_bytes == 0 and cause not in ("", "tls_error"):
            # A TLS 1.3 server refuses our certificate after our side of the handshake ended:
            # its alert comes with the first read. Nothing was relayed down: a refusal.
            outcome = "handshake_failed"
        self._on_end(Ended(outcome, source, cause, detail, up_bytes, down_bytes))

    def close(self, outcome: str = "shutdown") -> None:
        """Stop accepting, end every connection (close_notify to the destination)."""
        if self._watched:
            asyncio.get_running_loop().remove_reader(self._core.fileno())
            self._watched = False
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()
        self._core.close_all(outcome)


def run_on_loop(core: Core) -> None:
    """What an event loop calls when a core's descriptor is readable."""
    if core.run():  # a connection used up its turn: its next one after the others
        asyncio.get_running_loop().call_soon(run_on_loop, core)


def listening_sockets(listen: str, backlog: int = 4096) -> list[socket.socket]:
    """Bound, listening sockets for ``host:port`` (every address the host has; all interfaces
    when the host is empty)."""
    host, port = split_host_port(listen)
    found = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in found:
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets
