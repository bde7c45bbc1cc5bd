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

The core watches its own epoll descriptor; the event loop watches that one descriptor and
calls the core when it has events, and once a second for timeouts. The destination's name is
looked up when the tunnel starts and again every :data:`RESOLVE_EVERY_S`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
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
TICK_S = 1.0

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


def _cause(outcome: str, verify_code: int, reason: str, down_bytes: int) -> str:
    if outcome == "handshake_failed":
        if verify_code == PIN_MISMATCH:
            return "pin_mismatch"
        return cause_of_failure(verify_code, reason)
    if outcome in ("connect_failed", "connect_timeout", "tls_setup"):
        return outcome
    return cause_of_failure(0, reason) if reason else ""


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
    ) -> None:
        assert _tunnel is not None, WHY_NOT
        self._destination = destination
        self._host, self._port = split_host_port(destination.address)
        self._on_end = on_end
        server_name = destination.server_name or self._host
        context = build_context(destination, None)
        # The core's connections have no Python object for the ssl module's callbacks to find.
        if context.keylog_filename is not None:
            raise ValueError("the tunnel core cannot log TLS keys")
        self.chains: VerifiedChains = VerifiedChains(clock, frozenset(destination.pin_sha256), server_name)
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
        )
        self._sockets: list[socket.socket] = []
        self._tick: asyncio.TimerHandle | None = None
        self._resolving: asyncio.Task[None] | None = None
        self._next_resolve: float = 0.0
        self._clock: Clock = clock

    @property
    def connections(self) -> int:
        """Connections being set up or relayed."""
        return int(self._core.count)

    def listen(self, sock: socket.socket) -> None:
        """Accept from ``sock`` (bound, listening); the tunnel closes it at :meth:`close`."""
        sock.setblocking(False)
        self._core.listen(sock)
        self._sockets.append(sock)

    async def start(self) -> None:
        """Look the destination up, then serve (on the running loop) until :meth:`close`."""
        await self._resolve()
        loop = asyncio.get_running_loop()
        loop.add_reader(self._core.fileno(), self._core.run)
        self._next_resolve = self._clock.monotonic() + RESOLVE_EVERY_S
        self._tick = loop.call_later(TICK_S, self._expire)

    async def _resolve(self) -> None:
        loop = asyncio.get_running_loop()
        found = await loop.getaddrinfo(self._host, self._port, type=socket.SOCK_STREAM)
        if not found:
            raise OSError(f"{self._host}: no address")
        address = str(found[0][4][0])
        self._core.set_destination(address, self._port)

    def check_timeouts(self) -> None:
        """End the connections past their connect or idle timeout (by the tunnel's clock)."""
        self._core.expire()

    def _expire(self) -> None:
        self.check_timeouts()
        now = self._clock.monotonic()
        if now >= self._next_resolve and (self._resolving is None or self._resolving.done()):
            self._next_resolve = now + RESOLVE_EVERY_S
            self._resolving = asyncio.get_running_loop().create_task(self._re_resolve())
        self._tick = asyncio.get_running_loop().call_later(TICK_S, self._expire)

    async def _re_resolve(self) -> None:
        try:
            await self._resolve()
        except OSError as exc:  # keep the address it had
            log.warning("tunnel.resolve_failed", host=self._host, detail=str(exc))

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
        cause = _cause(outcome, verify_code, reason, down_bytes)
        if outcome == "destination_lost" and down_bytes == 0 and cause not in ("", "tls_error"):
            # A TLS 1.3 server refuses our certificate after our side of the handshake ended:
            # its alert comes with the first read. Nothing was relayed down: a refusal.
            outcome = "handshake_failed"
        self._on_end(Ended(outcome, source, cause, detail, up_bytes, down_bytes))

    def close(self, outcome: str = "shutdown") -> None:
        """Stop accepting, end every connection (close_notify to the destination)."""
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._core.fileno())
        if self._tick is not None:
            self._tick.cancel()
        if self._resolving is not None:
            self._resolving.cancel()
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()
        self._core.close_all(outcome)


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
