"""The compiled steady state of a splice (``_relay``, C), and when it stands in.

A splice without transforms, between endpoints that read the standard way (a
:class:`~fleetgate.dataplane.endpoint.PlainEndpoint` or a handshaken
:class:`~fleetgate.dataplane.tls_endpoint.TlsEndpoint`), relays through two ``_relay.Pipe``
objects set as the transports' protocols: a chunk read on one side is decrypted, encrypted and
written to the other side's transport in C, with no Python frame. Each pipe hands everything
else back to its endpoint (end of input, a lost connection, write flow control, alerts and
close_notify, a TLS connection's first reads), so the splice's logic stays in Python and reads
the same whether the pipes run or not. When the splice stops, the endpoints get their
transports back, with their byte counters brought up to date.

The compiled relay is used when the extension was built (``pip install`` compiles it; a
machine without a C compiler installs without it) and :mod:`~fleetgate.dataplane.native`
reached OpenSSL; otherwise the splice relays in Python, as before. ``FLEETGATE_RELAY=python``
in the environment turns it off (to compare, or to rule it out).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, cast

from fleetgate.clock import Clock, SystemClock
from fleetgate.dataplane import native
from fleetgate.dataplane.endpoint import Endpoint, PlainEndpoint
from fleetgate.dataplane.tls_endpoint import TlsEndpoint, receive_buffer

if TYPE_CHECKING:
    from fleetgate.dataplane._relay import Pipe


def _load() -> tuple[ModuleType | None, str]:
    if os.environ.get("FLEETGATE_RELAY", "") == "python":
        return None, "FLEETGATE_RELAY=python"
    try:
        from fleetgate.dataplane import _relay
    except ImportError as exc:
        return None, f"the compiled relay is not built ({exc})"
    if not native.AVAILABLE:
        return None, f"OpenSSL is not reachable: {native.WHY_NOT}"
    try:
        _relay.bind(*native.relay_entry_points())
    except (RuntimeError, ValueError) as exc:
        return None, f"OpenSSL's entry points: {exc}"
    _relay.use_buffer(receive_buffer())
    return _relay, ""


_relay, WHY_NOT = _load()
AVAILABLE = _relay is not None
ENABLED = AVAILABLE  # tests switch it off to exercise the Python relay


def _reads_the_standard_way(endpoint: Endpoint) -> bool:
    transport = endpoint.transport
    if transport is None or transport.is_closing() or endpoint.is_closed:
        return False
    if not hasattr(transport, "set_protocol"):
        return False
    if isinstance(endpoint, TlsEndpoint):
        return (
            endpoint.handshaken
            and type(endpoint).buffer_updated is TlsEndpoint.buffer_updated
            and type(endpoint).data_received is TlsEndpoint.data_received
        )
    return isinstance(endpoint, PlainEndpoint) and type(endpoint).data_received is (
        PlainEndpoint.data_received
    )


def attach(device: Endpoint, destination: Endpoint, clock: Clock) -> tuple[Pipe, Pipe] | None:
    """Relay between the two in C from now on, if both can; the pipes (device's first)."""
    if not ENABLED or _relay is None:
        return None
    if not (_reads_the_standard_way(device) and _reads_the_standard_way(destination)):
        return None
    monotonic: Callable[[], float] | None = (
        None if type(clock) is SystemClock else clock.monotonic  # None: the same clock, in C
    )
    pipes = (_pipe(device, monotonic), _pipe(destination, monotonic))
    pipes[0].join(pipes[1])
    pipes[1].join(pipes[0])
    for pipe in pipes:
        transport = pipe.endpoint.transport
        assert transport is not None
        transport.set_protocol(cast(asyncio.BaseProtocol, pipe))  # one by duck typing
    return pipes


def _pipe(endpoint: Endpoint, monotonic: Callable[[], float] | None) -> Pipe:
    assert _relay is not None
    assert endpoint.transport is not None
    address = native.ssl_address(endpoint.ssl_object) if isinstance(endpoint, TlsEndpoint) else 0
    pipe: Pipe = _relay.Pipe(endpoint, endpoint.transport, address, monotonic, _fd(endpoint))
    return pipe


def _socket_transports() -> tuple[type, ...]:
    """The transport types that write a TCP socket themselves, with nothing in between: the
    compiled relay may write such a socket directly while the transport has nothing queued
    (``get_write_buffer_size``), and close it with the failure its own send met
    (``_force_close(exc)``, which both have)."""
    from asyncio import selector_events

    kinds: list[type] = [selector_events._SelectorSocketTransport]  # type: ignore[attr-defined]
    try:
        import uvloop.loop
    except ImportError:
        pass
    else:
        kinds.append(uvloop.loop.TCPTransport)  # type: ignore[attr-defined]
    # Another version without what the relay calls simply writes through the transport.
    return tuple(kind for kind in kinds if callable(getattr(kind, "_force_close", None)))


_SOCKET_TRANSPORTS = _socket_transports()


def _fd(endpoint: Endpoint) -> int:
    """The socket to write directly, or -1 (through the transport only)."""
    transport = endpoint.transport
    if type(transport) not in _SOCKET_TRANSPORTS:
        return -1
    sock = transport.get_extra_info("socket")  # type: ignore[union-attr]
    return sock.fileno() if sock is not None else -1


def detach(pipes: tuple[Pipe, Pipe]) -> None:
    """Give the endpoints their transports back (those still open)."""
    for pipe in pipes:
        pipe.detach()
        endpoint = pipe.endpoint
        transport = endpoint.transport
        if transport is not None and transport.get_protocol() is cast(object, pipe):
            transport.set_protocol(endpoint)
