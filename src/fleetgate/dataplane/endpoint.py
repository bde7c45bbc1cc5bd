"""One end of a proxied connection: a transport read either by pulling (while a protocol handler
reads a CONNECT or an HTTP request) or by pushing (while two ends are spliced).

Protocol-level callbacks, not streams: in push mode a received chunk goes straight to the other
end's ``write`` with no task switch, and back-pressure is the transports' own pause/resume.
:class:`PlainEndpoint` is a TCP socket; :class:`~fleetgate.dataplane.tls_client.TlsClientEndpoint`
puts TLS (memory BIOs) between the socket and the same interface.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

# Pull mode stops reading the socket once this much is buffered and unread.
PULL_BUFFER_LIMIT = 256 * 1024


class PeerClosed(ConnectionError):
    """The other side went away while a handler was reading or writing."""


class Endpoint(asyncio.Protocol):
    """The shared machinery: pull buffer, push sink, write flow control, closing."""

    # Slots: a gateway holds tens of thousands of these; and a class whose instances carry
    # more than 30 attributes loses CPython's shared-key layout (a whole dict each).
    __slots__ = (
        "_buffer",
        "_closed_fut",
        "_drain_waiter",
        "_eof",
        "_lost",
        "_pause_requests",
        "_read_waiter",
        "_reading_paused",
        "_write_paused",
        "on_data",
        "on_eof",
        "on_lost",
        "on_write_paused",
        "received",
        "sent",
        "transport",
    )

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._eof = False
        self._lost: BaseException | None = None
        self._closed_fut: asyncio.Future[None] | None = None  # made when someone asks
        self._read_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._reading_paused = False
        self._pause_requests = 0  # push mode: how many reasons to keep the socket paused
        # Push mode (set by splice): where received bytes and the end of input go.
        self.on_data: Callable[[bytes], None] | None = None
        self.on_eof: Callable[[], None] | None = None
        self.on_write_paused: Callable[[bool], None] | None = None
        self.on_lost: Callable[[], None] | None = None  # the socket closed (after on_eof)
        self.received = 0
        self.sent = 0

    # -- transport side ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its interface.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = exc if exc is not None else PeerClosed("connection closed")
        was_eof, self._eof = self._eof, True
        self._wake_reader()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_exception(PeerClosed("connection closed"))
        if self._closed_fut is not None and not self._closed_fut.done():
            self._closed_fut.set_result(None)
        if not was_eof and self.on_eof is not None:
            self.on_eof()
        if self.on_lost is not None:
            self.on_lost()

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.on_write_paused is not None:
            self.on_write_paused(True)

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)
        if self.on_write_paused is not None:
            self.on_write_paused(False)

    # -- delivering plaintext (subclasses call these) ---------------------------------------------

    def _deliver(self, data: bytes) -> None:
        self.received += len(data)
        if self.on_data is not None:
            self.on_data(data)
            return
        self._buffer += data
        self._wake_reader()
        if len(self._buffer) > PULL_BUFFER_LIMIT and not self._reading_paused:
            self._set_reading(False)

    def _deliver_eof(self) -> None:
        if self._eof:
            return
        self._eof = True
        self._wake_reader()
        if self.on_eof is not None:
            self.on_eof()

    def _wake_reader(self) -> None:
        if self._read_waiter is not None and not self._read_waiter.done():
            self._read_waiter.set_result(None)

    # -- pulling --------------------------------------------------------------------------------

    @property
    def at_eof(self) -> bool:
        return self._eof and not self._buffer

    async def read_some(self) -> bytes:
        """Whatever is buffered (waiting for at least one byte); ``b""`` at the end of input."""
        while not self._buffer and not self._eof:
            self._read_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._read_waiter
            finally:
                self._read_waiter = None
        data = bytes(self._buffer)
        self._buffer.clear()
        if self._reading_paused:
            self._set_reading(True)
        return data

    def unread(self, data: bytes) -> None:
        """Put bytes back in front of the buffer (a handler read past a message)."""
        self._buffer[:0] = data

    def take_buffered(self) -> bytes:
        data = bytes(self._buffer)
        self._buffer.clear()
        if self._reading_paused and self._pause_requests <= 0:
            self._set_reading(True)  # pull mode had paused the socket on a full buffer
        return data

    # -- writing --------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def write_eof(self) -> None:
        raise NotImplementedError

    async def drain(self) -> None:
        if self._lost is not None and self.transport is not None and self.transport.is_closing():
            raise PeerClosed("connection closed")
        if self._write_paused:
            self._drain_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None

    # -- push-mode flow control -------------------------------------------------------------------

    def hold_reading(self, hold: bool) -> None:
        """The other end cannot take more (``True``) or can again (``False``)."""
        self._pause_requests += 1 if hold else -1
        self._set_reading(self._pause_requests <= 0)

    def _set_reading(self, on: bool) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if on and self._reading_paused:
            self._reading_paused = False
            self.transport.resume_reading()
        elif not on and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()

    # -- closing --------------------------------------------------------------------------------

    @property
    def closed(self) -> asyncio.Future[None]:
        """Done when the socket has closed."""
        if self._closed_fut is None:
            self._closed_fut = asyncio.get_running_loop().create_future()
            if self._lost is not None:
                self._closed_fut.set_result(None)
        return self._closed_fut

    @property
    def is_closed(self) -> bool:
        return self._lost is not None

    def ended_elsewhere(self) -> None:
        """The connection was relayed by the tunnel core (``handover``), with no transport,
        and has ended: what waits for its end hears of it."""
        self._eof = True
        if self._lost is None:
            self._lost = PeerClosed("connection closed")
        if self._closed_fut is not None and not self._closed_fut.done():
            self._closed_fut.set_result(None)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def peer_address(self) -> tuple[str, int] | None:
        if self.transport is None:
            return None
        peer = self.transport.get_extra_info("peername")
        return (str(peer[0]), int(peer[1])) if peer else None

    def local_address(self) -> tuple[str, int] | None:
        if self.transport is None:
            return None
        local = self.transport.get_extra_info("sockname")
        return (str(local[0]), int(local[1])) if local else None


class PlainEndpoint(Endpoint):
    """A TCP connection as it is."""

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        self._deliver(data)

    def eof_received(self) -> bool:
        self._deliver_eof()
        return True  # keep the socket open for the other direction (half-close)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.sent += len(data)
            self.transport.write(data)

    def write_eof(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            if self.transport.can_write_eof():
                self.transport.write_eof()
            else:
                self.transport.close()
