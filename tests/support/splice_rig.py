"""A splice under test: the device is one end of a socket pair, the destination a TLS server on
127.0.0.1 (the gateway's own server endpoint, which can also write a broken record), the
gateway's side the real upstream code. Shared by the compiled relay's and the tunnel core's
tests (``test_fastpath``, ``test_handover``)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from fleetgate.clock import FakeClock
from fleetgate.config.schema import DestinationConfig
from fleetgate.dataplane.endpoint import Endpoint, PlainEndpoint
from fleetgate.dataplane.splice import SpliceResult, Splicing, start_splice
from fleetgate.dataplane.tls_endpoint import TlsEndpoint
from fleetgate.dataplane.upstream import Upstream
from support.certs import TestCA
from support.tls_pair import server_context

# More batches than a TLS endpoint reads itself at first (FREE_BUFFER_READS): the messages
# after these go through the compiled relay.
WARM_UP = 8
TCP_CLOSE = 7  # linux/tcp.h: tcp_info.tcpi_state


class TlsDevice:
    """A device's TLS client over its own socket, through memory BIOs (so the test sees exactly
    how a stream ended: a close_notify, or a bare FIN, which asyncio's TLS does not tell
    apart)."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext) -> None:
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")

    async def _flush(self) -> None:
        if self.outgoing.pending:
            await asyncio.get_running_loop().sock_sendall(self.sock, self.outgoing.read())

    async def _fill(self) -> None:
        data = await asyncio.get_running_loop().sock_recv(self.sock, 65536)
        if data:
            self.incoming.write(data)
        else:
            self.incoming.write_eof()

    async def handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()
        await self._flush()

    async def send(self, data: bytes) -> None:
        self.tls.write(data)
        await self._flush()

    async def read(self, size: int) -> bytes:
        """Up to ``size`` bytes; b"" after the peer's close_notify. A bare FIN raises
        ``ssl.SSLEOFError``; a reset, ``ConnectionResetError``."""
        while True:
            try:
                return self.tls.read(size)
            except ssl.SSLZeroReturnError:
                return b""
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()

    async def close_notify(self) -> None:
        with contextlib.suppress(ssl.SSLWantReadError):
            self.tls.unwrap()
        await self._flush()


@dataclass
class Rig:
    device: socket.socket  # the device's own end
    device_end: Endpoint  # the gateway's end of the device's connection
    destination: Endpoint  # the gateway's TLS connection to the server
    server: TlsEndpoint  # the server's end of it
    compiled: bool
    dial: Callable[[], Awaitable[Endpoint]]  # another connection to the server, as the first
    # A device that speaks TLS: its streams (the socket is theirs), else None.
    tls: TlsDevice | None = None
    done: asyncio.Future[SpliceResult] = field(init=False)
    splicing: Splicing = field(init=False)

    def start(self, clock: FakeClock, idle_timeout_s: float = 60.0) -> None:
        self.done = asyncio.get_running_loop().create_future()

        def finished(splicing: Splicing, result: SpliceResult) -> None:
            splicing.device.close()  # as every user of start_splice does
            splicing.destination.close()
            self.done.set_result(result)

        self.splicing = start_splice(
            self.device_end,
            self.destination,
            clock,
            idle_timeout_s=idle_timeout_s,
            on_done=finished,
        )

    async def send(self, data: bytes) -> None:
        if self.tls is not None:
            await self.tls.send(data)
            return
        await asyncio.get_running_loop().sock_sendall(self.device, data)

    async def _chunk(self, size: int) -> bytes:
        if self.tls is not None:
            return await self.tls.read(size)
        return await asyncio.get_running_loop().sock_recv(self.device, size)

    async def receive(self, size: int) -> bytes:
        got = bytearray()
        while len(got) < size:
            chunk = await self._chunk(size - len(got))
            assert chunk, f"the device's connection ended after {len(got)} of {size} bytes"
            got += chunk
        return bytes(got)

    async def receive_to_reset(self) -> bytes:
        """What the device reads before its connection is reset (and it must be)."""
        got = bytearray()
        try:
            while chunk := await self._chunk(65536):
                got += chunk
        except ConnectionResetError:
            return bytes(got)
        raise AssertionError(f"the device's connection ended cleanly after {len(got)} bytes")

    async def receive_to_end(self) -> bytes:
        got = bytearray()
        while chunk := await self._chunk(65536):
            got += chunk
        return bytes(got)


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Both ends of a TCP connection on 127.0.0.1 (non-blocking): a device's, as the gateway
    accepts it (a reset is a reset, as a socket pair's is not)."""
    with socket.create_server(("127.0.0.1", 0)) as listening:
        device = socket.create_connection(listening.getsockname())
        gateway_side, _ = listening.accept()
    for sock in (device, gateway_side):
        sock.setblocking(False)
    return device, gateway_side


@contextlib.asynccontextmanager
async def splice_rig(
    tmp_path: Path, compiled: bool, *, tcp: bool = False, device_tls: bool = False
) -> AsyncIterator[Rig]:
    """``tcp``: the device's connection is TCP (else a socket pair, whose small buffers fill
    sooner: flow control is exercised with less data). ``device_tls``: the device speaks TLS
    to the gateway (TCP; the gateway's end is a server-side TlsEndpoint, handshaken)."""
    ca = TestCA.create("fastpath root")
    cafile = ca.write_bundle(tmp_path / "ca.pem")
    context = server_context(ca.issue_server().write(tmp_path, "server"))
    loop = asyncio.get_running_loop()
    accepted: asyncio.Queue[TlsEndpoint] = asyncio.Queue()

    def serve() -> TlsEndpoint:
        endpoint = TlsEndpoint(context, server_side=True)
        endpoint.handshake.add_done_callback(lambda _: accepted.put_nowait(endpoint))
        return endpoint

    listening = await loop.create_server(serve, "127.0.0.1", 0)
    port = listening.sockets[0].getsockname()[1]
    upstream = Upstream(FakeClock())
    config = DestinationConfig(
        address=f"127.0.0.1:{port}", server_name="localhost", ca_file=str(cafile)
    )

    async def dial() -> Endpoint:
        return await upstream.connect("to", config, None)

    destination = await dial()
    server = await asyncio.wait_for(accepted.get(), 10)
    device, gateway_side = tcp_pair() if tcp or device_tls else socket.socketpair()
    device.setblocking(False)
    tls = None
    device_end: Endpoint
    if device_tls:
        gateway_context = server_context(ca.issue_server().write(tmp_path, "gateway"))
        _, device_end = await loop.connect_accepted_socket(
            lambda: TlsEndpoint(gateway_context, server_side=True), gateway_side
        )
        tls = TlsDevice(device, ssl.create_default_context(cafile=cafile))
        await asyncio.wait_for(tls.handshake(), 10)
        assert isinstance(device_end, TlsEndpoint)
        await asyncio.wait_for(device_end.handshake, 10)
    else:
        _, device_end = await loop.connect_accepted_socket(PlainEndpoint, gateway_side)
    yield Rig(device, device_end, destination, server, compiled, dial, tls)
    for endpoint in (device_end, destination, server):
        endpoint.abort()
    device.close()
    listening.close()
    await listening.wait_closed()


async def server_read(server: TlsEndpoint, size: int) -> bytes:
    got = bytearray()
    while len(got) < size:
        chunk = await asyncio.wait_for(server.read_some(), 10)
        assert chunk, f"the server's connection ended after {len(got)} of {size} bytes"
        got += chunk
    return bytes(got)


async def exchange(rig: Rig, count: int, size: int = 100) -> int:
    """``count`` messages up and their answers down, one at a time; the bytes each way."""
    for number in range(count):
        message = (b"%06d" % number) * (size // 6)
        await rig.send(message)
        assert await server_read(rig.server, len(message)) == message
        rig.server.write(message.upper())
        assert await rig.receive(len(message)) == message.upper()
    return count * (size // 6) * 6


async def broken_record(rig: Rig) -> None:
    """Good data, then an application-data record whose authentication cannot pass, written
    together on the server's socket: what authenticated still reaches the device."""
    assert rig.server.transport is not None
    rig.server.write(b"tail")
    rig.server.transport.write(b"\x17\x03\x03\x00\x20" + bytes(32))


async def reset(rig: Rig) -> None:
    assert rig.server.transport is not None
    sock = rig.server.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # an RST
    rig.server.abort()


async def reset_seen_by(sock: socket.socket) -> None:
    """Until the peer's RST has closed ``sock`` (its TCP state, read without taking the error)."""
    deadline = asyncio.get_running_loop().time() + 10
    while sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] != TCP_CLOSE:
        assert asyncio.get_running_loop().time() < deadline, "the reset never arrived"
        await asyncio.sleep(0.01)


def assert_destination_lost(
    rig: Rig, result: SpliceResult, moved: int, tail: bytes, cause: str | None
) -> None:
    """The splice ended as the destination's failure, with what authenticated before it
    relayed and the failure's cause (None: none named) on the destination's endpoint."""
    assert (result.reason, result.up_bytes, result.down_bytes) == (
        "destination_lost",
        moved,
        moved + len(tail),
    )
    assert isinstance(rig.destination, TlsEndpoint)
    failure = rig.destination.failure
    assert (failure.cause if failure else None) == cause
