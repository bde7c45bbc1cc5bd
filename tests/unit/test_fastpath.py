"""The compiled relay (``_relay`` through ``fastpath``) against the Python one: the same bytes,
the same counts, the same half-closes, flow control and failure causes.

Every test runs twice, with the compiled relay and with it switched off; three also run on uvloop
(the gateway's loop), whose sockets the compiled relay writes directly. The device is one end
of a socket pair; the destination is a TLS server on 127.0.0.1 (the gateway's own server
endpoint, which can also write a broken record); the gateway's side is the real upstream code.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import uvloop

from fleetgate.clock import FakeClock
from fleetgate.config.schema import DestinationConfig
from fleetgate.dataplane import fastpath
from fleetgate.dataplane.endpoint import Endpoint, PlainEndpoint
from fleetgate.dataplane.idle import idle_watch
from fleetgate.dataplane.splice import SpliceResult, Splicing, start_splice
from fleetgate.dataplane.tls_endpoint import TlsEndpoint
from fleetgate.dataplane.upstream import Upstream
from support.certs import TestCA
from support.tls_pair import server_context

# More batches than a TLS endpoint reads itself at first (FREE_BUFFER_READS): the messages
# after these go through the compiled relay.
WARM_UP = 8
TCP_CLOSE = 7  # linux/tcp.h: tcp_info.tcpi_state


def test_the_compiled_relay_is_built_and_bound() -> None:
    # scripts/test installs the package, which compiles it; FLEETGATE_RELAY=python turns it off.
    assert fastpath.AVAILABLE, fastpath.WHY_NOT


def test_the_gateways_transports_are_written_directly() -> None:
    # Both loops' socket transports have what direct writes need; a version that lost it would
    # quietly relay slower (through the transport), so it fails here instead.
    assert {type_.__module__ for type_ in fastpath._SOCKET_TRANSPORTS} == {
        "asyncio.selector_events",
        "uvloop.loop",
    }


@dataclass
class Rig:
    device: socket.socket  # the device's own end
    device_end: PlainEndpoint  # the gateway's end of the device's connection
    destination: Endpoint  # the gateway's TLS connection to the server
    server: TlsEndpoint  # the server's end of it
    compiled: bool
    done: asyncio.Future[SpliceResult] = field(init=False)
    splicing: Splicing = field(init=False)

    def start(self, clock: FakeClock) -> None:
        self.done = asyncio.get_running_loop().create_future()

        def finished(splicing: Splicing, result: SpliceResult) -> None:
            splicing.device.close()  # as every user of start_splice does
            splicing.destination.close()
            self.done.set_result(result)

        self.splicing = start_splice(
            self.device_end, self.destination, clock, idle_timeout_s=60.0, on_done=finished
        )

    async def send(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.device, data)

    async def receive(self, size: int) -> bytes:
        got = bytearray()
        while len(got) < size:
            chunk = await asyncio.get_running_loop().sock_recv(self.device, size - len(got))
            assert chunk, f"the device's connection ended after {len(got)} of {size} bytes"
            got += chunk
        return bytes(got)

    async def receive_to_end(self) -> bytes:
        got = bytearray()
        while chunk := await asyncio.get_running_loop().sock_recv(self.device, 65536):
            got += chunk
        return bytes(got)


async def _server_read(server: TlsEndpoint, size: int) -> bytes:
    got = bytearray()
    while len(got) < size:
        chunk = await asyncio.wait_for(server.read_some(), 10)
        assert chunk, f"the server's connection ended after {len(got)} of {size} bytes"
        got += chunk
    return bytes(got)


@pytest.fixture(params=["compiled", "python"])
async def rig(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Rig]:
    compiled = request.param == "compiled"
    monkeypatch.setattr(fastpath, "ENABLED", compiled)
    async with _rig(tmp_path, compiled) as made:
        yield made


@contextlib.asynccontextmanager
async def _rig(tmp_path: Path, compiled: bool) -> AsyncIterator[Rig]:
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
    destination = await Upstream(FakeClock()).connect(
        "to",
        DestinationConfig(
            address=f"127.0.0.1:{port}", server_name="localhost", ca_file=str(cafile)
        ),
        None,
    )
    server = await asyncio.wait_for(accepted.get(), 10)
    device, gateway_side = socket.socketpair()
    device.setblocking(False)
    _, device_end = await loop.connect_accepted_socket(PlainEndpoint, gateway_side)
    yield Rig(device, device_end, destination, server, compiled)
    for endpoint in (device_end, destination, server):
        endpoint.abort()
    device.close()
    listening.close()
    await listening.wait_closed()


async def _exchange(rig: Rig, count: int, size: int = 100) -> int:
    """``count`` messages up and their answers down, one at a time; the bytes each way."""
    for number in range(count):
        message = (b"%06d" % number) * (size // 6)
        await rig.send(message)
        assert await _server_read(rig.server, len(message)) == message
        rig.server.write(message.upper())
        assert await rig.receive(len(message)) == message.upper()
    return count * (size // 6) * 6


def _relays_in_c(rig: Rig) -> bool:
    assert rig.device_end.transport is not None
    return type(rig.device_end.transport.get_protocol()).__name__ == "Pipe"


async def test_messages_cross_both_ways_and_each_half_close_is_passed_on(rig: Rig) -> None:
    rig.start(FakeClock())
    moved = await _exchange(rig, WARM_UP + 4)
    assert _relays_in_c(rig) == rig.compiled
    if rig.compiled:
        assert rig.splicing.pipes is not None
        assert rig.splicing.pipes[0].received > 0  # the later messages did not come through Python
        assert rig.splicing.pipes[1].received > 0

    rig.device.shutdown(socket.SHUT_WR)  # the device is done: close_notify to the server
    assert await asyncio.wait_for(rig.server.read_some(), 10) == b""
    # Counted as it went: what the end of input reached Python code with, mid-splice.
    assert rig.device_end.received == moved
    rig.server.write(b"last words")  # the other direction goes on
    rig.server.write_eof()
    assert await rig.receive_to_end() == b"last words"

    result = await asyncio.wait_for(rig.done, 10)
    assert result == SpliceResult(moved, moved + len(b"last words"), "closed")
    # The endpoints' own counters are up to date once the splice is over.
    assert (rig.device_end.received, rig.destination.sent) == (moved, moved)
    assert (rig.destination.received, rig.device_end.sent) == (moved + 10, moved + 10)
    assert not _relays_in_c(rig)  # the transports were given back


async def test_a_large_transfer_arrives_whole_through_flow_control(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    pauses: list[bool] = []
    original = PlainEndpoint.pause_writing

    def counted(self: PlainEndpoint) -> None:
        pauses.append(True)
        original(self)

    monkeypatch.setattr(PlainEndpoint, "pause_writing", counted)
    rig.start(FakeClock())
    await _exchange(rig, WARM_UP)

    async def echo() -> None:  # the server sends back what it reads, as fast as it is taken
        while data := await rig.server.read_some():
            rig.server.write(data)
            await rig.server.drain()
        rig.server.write_eof()

    serving = asyncio.get_running_loop().create_task(echo())
    payload = os.urandom(16 * 1024 * 1024)
    sending = asyncio.get_running_loop().create_task(rig.send(payload))
    digest, received = hashlib.sha256(), 0
    while received < len(payload):  # a slow reader: small reads, so the gateway must hold back
        chunk = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(rig.device, 4096), 10)
        assert chunk, f"the device's connection ended after {received} bytes"
        digest.update(chunk)
        received += len(chunk)
    await sending
    assert digest.digest() == hashlib.sha256(payload).digest()
    assert pauses, "the device's connection never filled: flow control was not exercised"

    rig.device.shutdown(socket.SHUT_WR)
    assert await rig.receive_to_end() == b""
    await asyncio.wait_for(serving, 10)
    result = await asyncio.wait_for(rig.done, 10)
    assert result.reason == "closed"
    assert result.up_bytes == result.down_bytes == len(payload) + WARM_UP * 96


async def _broken_record(rig: Rig) -> None:
    """Good data, then an application-data record whose authentication cannot pass, written
    together on the server's socket: what authenticated still reaches the device."""
    assert rig.server.transport is not None
    rig.server.write(b"tail")
    rig.server.transport.write(b"\x17\x03\x03\x00\x20" + bytes(32))


async def _reset(rig: Rig) -> None:
    assert rig.server.transport is not None
    sock = rig.server.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # an RST
    rig.server.abort()


@pytest.mark.parametrize(
    ("breaking", "cause"),
    [(_broken_record, "bad_record_mac"), (_reset, None)],
    ids=["broken-record", "reset"],
)
async def test_a_broken_destination_ends_the_splice_with_the_same_cause(
    rig: Rig, breaking: Callable[[Rig], Awaitable[None]], cause: str | None
) -> None:
    rig.start(FakeClock())
    moved = await _exchange(rig, WARM_UP + 2)
    await breaking(rig)
    tail = b"tail" if cause else b""
    assert await rig.receive_to_end() == tail  # and the device's connection ends with it
    result = await asyncio.wait_for(rig.done, 10)
    assert (result.reason, result.up_bytes, result.down_bytes) == (
        "destination_lost",
        moved,
        moved + len(tail),
    )
    assert isinstance(rig.destination, TlsEndpoint)
    failure = rig.destination.failure
    assert (failure.cause if failure else None) == cause


async def _reset_seen_by(sock: socket.socket) -> None:
    """Until the peer's RST has closed ``sock`` (its TCP state, read without taking the error)."""
    deadline = asyncio.get_running_loop().time() + 10
    while sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] != TCP_CLOSE:
        assert asyncio.get_running_loop().time() < deadline, "the reset never arrived"
        await asyncio.sleep(0.01)


async def test_a_reset_that_a_relayed_write_meets_keeps_its_cause(rig: Rig) -> None:
    """A TLS 1.3 server that refuses our certificate closes with our bytes unread: a reset.
    When a relayed write is the first to meet it (the kernel reports it once), the endpoint
    must still learn it was a reset right after the handshake."""
    rig.start(FakeClock())
    transport = rig.destination.transport
    assert transport is not None
    transport.pause_reading()  # a write meets the reset, not a read
    await _reset(rig)
    await _reset_seen_by(transport.get_extra_info("socket"))
    await rig.send(b"never delivered")
    result = await asyncio.wait_for(rig.done, 10)
    assert result.reason == "destination_lost"
    assert isinstance(rig.destination, TlsEndpoint)
    failure = rig.destination.failure
    assert failure is not None
    assert failure.cause == "reset_after_handshake", failure


async def test_activity_in_c_keeps_an_idle_deadline_away(rig: Rig) -> None:
    clock = FakeClock()
    rig.start(clock)
    await _exchange(rig, WARM_UP)
    clock.advance(50.0)
    await _exchange(rig, 1)  # at 50 s: the deadline moves to 110 s
    watch = idle_watch(clock)
    clock.advance(20.0)  # 70 s: past the first deadline (60 s), not the second
    watch.tick()
    assert not rig.splicing.finished.done()
    clock.advance(45.0)  # 115 s
    watch.tick()
    result = await asyncio.wait_for(rig.done, 10)
    assert result.reason == "idle_timeout"


@pytest.mark.parametrize("case", ["messages-and-half-closes", "large-transfer", "reset"])
def test_on_uvloop_the_direct_writes_keep_every_byte_in_order(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gateway's own loop. The compiled relay writes a socket itself while its transport has
    nothing queued, so the order of the bytes rests on uvloop's account of what it holds."""
    monkeypatch.setattr(fastpath, "ENABLED", True)

    async def run() -> None:
        async with _rig(tmp_path, compiled=True) as rig:
            assert type(rig.device_end.transport).__module__ == "uvloop.loop"
            if case == "large-transfer":
                await test_a_large_transfer_arrives_whole_through_flow_control(rig, monkeypatch)
            elif case == "reset":
                await test_a_reset_that_a_relayed_write_meets_keeps_its_cause(rig)
            else:
                await test_messages_cross_both_ways_and_each_half_close_is_passed_on(rig)

    uvloop.run(run())
