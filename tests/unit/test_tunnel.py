"""The tunnel core (``_tunnel`` through ``tunnel``): whole connections in C, against a real TLS
server on 127.0.0.1 and real device sockets.

What each test shows is what ``fleetgate connect`` promises: bytes both ways with back-pressure,
half-closes passed on (close_notify one way, a TCP FIN the other), the destination verified
(CA, name, pins) with the precise cause of a refusal, the client certificate presented, the
session resumed, and every connection reported once at its end, with its timeouts on an
injected clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import ssl
import struct
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fleetgate.clock import FakeClock
from fleetgate.config.schema import DestinationConfig
from fleetgate.dataplane import tunnel
from fleetgate.dataplane.upstream import ClientCertificate
from fleetgate.sealing import Secret
from support.certs import CertFiles, PeerCertificate, TestCA, spki_sha256_b64
from support.tls_pair import server_context

TIMEOUT_S = 10.0


def test_the_tunnel_core_is_built_and_bound() -> None:
    # scripts/test installs the package, which compiles it; FLEETGATE_RELAY=python turns it off.
    assert tunnel.AVAILABLE, tunnel.WHY_NOT


@dataclass
class Served:
    """One connection as the destination saw it."""

    received: bytes
    resumed: bool
    client_cn: str | None
    version: str | None
    ended: str = ""  # close_notify, or cut (a FIN without it, a reset)


class Destination:
    """A TLS server on 127.0.0.1, a thread per connection (blocking ``ssl`` sockets, which
    half-close properly, unlike asyncio's): echoes what it gets unless ``echo`` is off, waits
    for ``go`` before reading, answers the client's close_notify with ``trailer`` and its own
    close_notify. What it saw reaches the test's loop through queues."""

    def __init__(self, context: ssl.SSLContext, *, echo: bool = True, trailer: bytes = b"") -> None:
        self.context = context
        self.echo = echo
        self.trailer = trailer
        self.go = threading.Event()
        self.go.set()
        self.served: asyncio.Queue[Served] = asyncio.Queue()
        self.failures: asyncio.Queue[str] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._listening = socket.create_server(("127.0.0.1", 0))
        self.port = self._listening.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _post[T](self, queue: asyncio.Queue[T], item: T) -> None:
        try:
            self._loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:
            if not self._loop.is_closed():
                raise
            # a connection that outlived its test (a cut one ends on its timeout): unheard

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self._listening.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        raw.settimeout(TIMEOUT_S)
        try:
            conn = self.context.wrap_socket(raw, server_side=True, suppress_ragged_eofs=False)
        except (ssl.SSLError, OSError) as exc:
            raw.close()
            self._post(self.failures, getattr(exc, "reason", None) or type(exc).__name__)
            return
        der = conn.getpeercert(binary_form=True)
        client_cn = PeerCertificate.from_der(der).common_name if der else None
        resumed, version = conn.session_reused, conn.version()
        received = bytearray()
        ended = "cut"
        try:
            self.go.wait(TIMEOUT_S)
            while data := conn.recv(1 << 16):
                received += data
                if self.echo:
                    conn.sendall(data)
            ended = "close_notify"  # (a ragged end raises: suppress_ragged_eofs is off)
            if self.trailer:
                conn.sendall(self.trailer)
            conn.unwrap()
        except (ssl.SSLError, OSError):
            pass
        finally:
            served = Served(bytes(received), bool(resumed), client_cn, version, ended)
            conn.close()
            self._post(self.served, served)

    async def next_served(self) -> Served:
        return await asyncio.wait_for(self.served.get(), TIMEOUT_S)

    def close(self) -> None:
        self.go.set()
        self._listening.close()


@dataclass
class Rig:
    ca: TestCA
    cafile: Path
    server_files: CertFiles
    tmp_path: Path
    clock: FakeClock = field(default_factory=FakeClock)
    ends: asyncio.Queue[tunnel.Ended] = field(default_factory=asyncio.Queue)
    servers: list[Destination] = field(default_factory=list)

    def destination(
        self, *, client_cafile: Path | None = None, echo: bool = True, trailer: bytes = b""
    ) -> Destination:
        made = Destination(
            server_context(self.server_files, client_cafile=client_cafile),
            echo=echo,
            trailer=trailer,
        )
        self.servers.append(made)
        return made

    @contextlib.asynccontextmanager
    async def open_tunnel(
        self,
        port: int,
        *,
        client: ClientCertificate | None = None,
        idle_timeout_s: float = 60.0,
        turn_chunks: int = 16,
        **settings: Any,
    ) -> AsyncIterator[tuple[tunnel.Tunnel, int]]:
        config = {"server_name": "localhost", "ca_file": str(self.cafile), **settings}
        destination = DestinationConfig(address=f"127.0.0.1:{port}", **config)
        made = tunnel.Tunnel(
            destination,
            client,
            self.clock,
            idle_timeout_s=idle_timeout_s,
            on_end=self.ends.put_nowait,
            turn_chunks=turn_chunks,
        )
        [listening] = tunnel.listening_sockets("127.0.0.1:0")
        local_port = listening.getsockname()[1]
        made.listen(listening)
        await made.start()
        try:
            yield made, local_port
        finally:
            made.close()

    async def next_end(self) -> tunnel.Ended:
        return await asyncio.wait_for(self.ends.get(), TIMEOUT_S)


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    ca = TestCA.create("tunnel root")
    made = Rig(
        ca, ca.write_bundle(tmp_path / "ca.pem"), ca.issue_server().write(tmp_path, "server"),
        tmp_path,
    )  # fmt: skip
    yield made
    for server in made.servers:
        server.close()


async def _device(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), TIMEOUT_S)


async def _read_to_end(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.read(), TIMEOUT_S)


async def _reset(reader: asyncio.StreamReader) -> bool:
    """Reset without a byte: how the tunnel refuses a device (never a clean end it could take
    for an empty answer)."""
    try:
        await _read_to_end(reader)
    except ConnectionResetError:
        return True
    return False


async def test_bytes_go_both_ways_and_each_half_close_is_passed_on(rig: Rig) -> None:
    server = rig.destination(trailer=b"the destination's last word")
    async with rig.open_tunnel(server.port) as (_, port):
        reader, writer = await _device(port)
        writer.write(b"hello through the tunnel")
        assert await asyncio.wait_for(reader.readexactly(24), TIMEOUT_S) == (
            b"hello through the tunnel"
        )
        writer.write_eof()  # -> close_notify to the destination, which still answers
        assert await _read_to_end(reader) == b"the destination's last word"
        writer.close()
        served = await server.next_served()
        ended = await rig.next_end()
    assert served.received == b"hello through the tunnel"
    assert served.version == "TLSv1.3"
    assert (ended.outcome, ended.source, ended.cause) == ("closed", "127.0.0.1", "")
    assert (ended.up_bytes, ended.down_bytes) == (24, 24 + len(b"the destination's last word"))


@pytest.mark.parametrize("turn_chunks", [16, 1])
async def test_sixteen_mebibytes_each_way_arrive_whole_through_back_pressure(
    rig: Rig, turn_chunks: int
) -> None:
    """With one chunk per turn, a direction that has more to read lets the others go first
    and comes back to it: nothing lost, nothing stalled."""
    server = rig.destination()
    payload = os.urandom(16 << 20)
    async with rig.open_tunnel(server.port, turn_chunks=turn_chunks) as (made, port):
        reader, writer = await _device(port)

        async def send() -> None:
            writer.write(payload)
            await writer.drain()
            writer.write_eof()

        sending = asyncio.create_task(send())
        echoed = await _read_to_end(reader)
        await sending
        writer.close()
        ended = await rig.next_end()
        if turn_chunks == 1:
            assert made.turns_posted > 0  # the turns were used up, and given again
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
    assert (ended.outcome, ended.up_bytes, ended.down_bytes) == ("closed", 16 << 20, 16 << 20)


async def test_a_direction_that_used_up_its_turn_gets_the_next_one(rig: Rig) -> None:
    """One chunk per turn, and nothing else happening on the connection (the destination
    sends nothing back): what the device sent is read turn after turn until its end."""
    server = rig.destination(echo=False)
    payload = os.urandom(8 << 20)
    async with rig.open_tunnel(server.port, turn_chunks=1) as (made, port):
        reader, writer = await _device(port)
        writer.write(payload)
        writer.write_eof()
        await asyncio.wait_for(writer.drain(), TIMEOUT_S)
        assert await _read_to_end(reader) == b""
        writer.close()
        served = await server.next_served()
        assert made.turns_posted > 0
    assert hashlib.sha256(served.received).digest() == hashlib.sha256(payload).digest()


async def test_a_destination_that_does_not_read_holds_back_the_device(rig: Rig) -> None:
    """What the destination does not take stays in the sockets' buffers: the tunnel keeps at
    most one chunk, stops reading the device, and the device's writes block. Once the
    destination reads, every byte arrives, in order."""
    server = rig.destination(echo=False)
    server.go.clear()
    total = 64 << 20  # far more than every socket buffer on the way holds
    chunk = bytes(range(256)) * 256
    async with rig.open_tunnel(server.port) as (_, port):
        reader, writer = await _device(port)
        written = 0

        async def push() -> None:
            nonlocal written
            while written < total:
                writer.write(chunk)
                written += len(chunk)
                await writer.drain()

        with pytest.raises(TimeoutError):  # it stalls: the tunnel pushed back
            await asyncio.wait_for(push(), 3.0)
        assert written < total
        server.go.set()
        await asyncio.wait_for(writer.drain(), TIMEOUT_S)
        writer.write_eof()
        assert await _read_to_end(reader) == b""
        writer.close()
        served = await server.next_served()
        ended = await rig.next_end()
    assert len(served.received) == written
    assert served.received == chunk * (written // len(chunk))
    assert (ended.outcome, ended.up_bytes) == ("closed", written)


async def test_the_next_connection_resumes_the_session_and_presents_the_certificate(
    rig: Rig,
) -> None:
    server = rig.destination(client_cafile=rig.cafile)
    device_files = rig.ca.issue_client("sensor-7").write(rig.tmp_path, "client")
    client = ClientCertificate(
        "sensor-7@1", device_files.cert.read_bytes(), Secret(device_files.key.read_bytes())
    )
    async with rig.open_tunnel(server.port, client=client) as (_, port):
        served = []
        for attempt in range(3):
            reader, writer = await _device(port)
            writer.write(b"attempt %d" % attempt)
            await asyncio.wait_for(reader.readexactly(9), TIMEOUT_S)
            writer.write_eof()
            assert await _read_to_end(reader) == b""
            writer.close()
            served.append(await server.next_served())
            assert (await rig.next_end()).outcome == "closed"
            rig.clock.advance(1.5)  # the kept session is refreshed at most once a second
    assert [s.client_cn for s in served] == ["sensor-7"] * 3
    assert [s.resumed for s in served] == [False, True, True]


async def test_without_resumption_every_handshake_is_full(rig: Rig) -> None:
    server = rig.destination()
    async with rig.open_tunnel(server.port, session_resumption=False) as (_, port):
        for _ in range(2):
            reader, writer = await _device(port)
            writer.write_eof()
            assert await _read_to_end(reader) == b""
            writer.close()
            assert (await server.next_served()).resumed is False
            await rig.next_end()


@pytest.mark.parametrize("cause", ["unknown_ca", "hostname_mismatch", "pin_mismatch"])
async def test_a_destination_that_fails_verification_is_refused_with_its_cause(
    rig: Rig, cause: str
) -> None:
    server = rig.destination()
    settings: dict[str, Any] = {}
    match cause:
        case "unknown_ca":
            stranger = TestCA.create("stranger").write_bundle(rig.tmp_path / "stranger.pem")
            settings["ca_file"] = str(stranger)
        case "hostname_mismatch":
            settings["server_name"] = "other.test"
        case _:
            settings["pin_sha256"] = [spki_sha256_b64(TestCA.create("unpinned").certificate)]
    async with rig.open_tunnel(server.port, **settings) as (made, port):
        reader, writer = await _device(port)
        writer.write(b"secret")
        assert await _reset(reader)
        writer.close()
        ended = await rig.next_end()
        assert made.connections == 0
    assert ended.refused
    assert (ended.outcome, ended.cause) == ("handshake_failed", cause)
    assert ended.detail
    assert ended.up_bytes == 0
    await asyncio.wait_for(server.failures.get(), TIMEOUT_S)  # our alert ended its handshake
    assert server.served.empty()


async def test_a_pin_that_matches_lets_the_connection_through(rig: Rig) -> None:
    server = rig.destination()
    pin = spki_sha256_b64(rig.ca.certificate)
    async with rig.open_tunnel(server.port, pin_sha256=[pin]) as (made, port):
        reader, writer = await _device(port)
        writer.write(b"pinned")
        assert await asyncio.wait_for(reader.readexactly(6), TIMEOUT_S) == b"pinned"
        writer.write_eof()
        assert await _read_to_end(reader) == b""
        writer.close()
        assert (await rig.next_end()).outcome == "closed"
        assert (made.chains.misses, made.chains.hits) == (1, 0)


async def test_a_refused_client_certificate_is_a_refusal_not_a_relayed_connection(
    rig: Rig,
) -> None:
    """TLS 1.3: the server refuses the missing certificate after our side of the handshake
    ended; its alert comes with the first read, before any byte went down."""
    server = rig.destination(client_cafile=rig.cafile)
    async with rig.open_tunnel(server.port) as (_, port):
        reader, writer = await _device(port)
        assert await _reset(reader)
        writer.close()
        ended = await rig.next_end()
    assert (ended.outcome, ended.cause) == ("handshake_failed", "client_certificate_refused")


async def test_a_closed_port_is_refused_as_connect_failed(rig: Rig) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        closed_port = unused.getsockname()[1]
    async with rig.open_tunnel(closed_port) as (_, port):
        await _refused_as_connect_failed(rig, port)


async def _refused_as_connect_failed(rig: Rig, port: int) -> None:
    reader, writer = await _device(port)
    assert await _reset(reader)
    writer.close()
    ended = await rig.next_end()
    assert (ended.outcome, ended.cause) == ("connect_failed", "connect_failed")
    assert "refused" in ended.detail.lower()


async def test_each_address_of_the_destination_is_tried_in_turn(rig: Rig) -> None:
    server = rig.destination()
    async with rig.open_tunnel(server.port) as (made, port):
        # As a name with several addresses resolves: the first refuses (nothing listens on
        # 127.0.0.2 at that port), the second is the server.
        made._core.set_destination(["127.0.0.2", "127.0.0.1"], server.port)
        reader, writer = await _device(port)
        writer.write(b"second address")
        assert await asyncio.wait_for(reader.readexactly(14), TIMEOUT_S) == b"second address"
        writer.write_eof()
        assert await _read_to_end(reader) == b""
        writer.close()
        assert (await rig.next_end()).outcome == "closed"
        made._core.set_destination(["127.0.0.2"], server.port)  # no address that answers
        await _refused_as_connect_failed(rig, port)


async def test_an_address_is_not_looked_up_again_but_a_name_is(rig: Rig) -> None:
    server = rig.destination()
    async with rig.open_tunnel(server.port) as (by_address, _):
        rig.clock.advance(tunnel.RESOLVE_EVERY_S)
        by_address.tick()
        assert by_address._resolver is None  # no thread for 127.0.0.1
    destination = DestinationConfig(
        address=f"localhost:{server.port}", server_name="localhost", ca_file=str(rig.cafile)
    )
    by_name = tunnel.Tunnel(destination, None, rig.clock, idle_timeout_s=60.0, on_end=print)
    by_name.resolve()
    rig.clock.advance(tunnel.RESOLVE_EVERY_S)
    by_name.tick()
    resolver = by_name._resolver
    assert resolver is not None
    await asyncio.to_thread(resolver.join, TIMEOUT_S)
    assert by_name._found == ["127.0.0.1"]
    by_name.close()


async def test_a_destination_that_never_answers_times_out_on_the_clock(rig: Rig) -> None:
    silent = socket.create_server(("127.0.0.1", 0))  # accepts TCP, never speaks TLS
    with silent:
        async with rig.open_tunnel(silent.getsockname()[1], connect_timeout_s=5.0) as (made, port):
            reader, writer = await _device(port)
            held = await asyncio.wait_for(_accepted(silent), TIMEOUT_S)
            made.check_timeouts()
            assert made.connections == 1  # not yet: the clock has not moved
            rig.clock.advance(5.0)
            made.check_timeouts()
            assert await _reset(reader)
            writer.close()
            ended = await rig.next_end()
            held.close()
    assert (ended.outcome, ended.cause) == ("connect_timeout", "connect_timeout")


async def _accepted(listening: socket.socket) -> socket.socket:
    listening.setblocking(False)
    conn, _ = await asyncio.get_running_loop().sock_accept(listening)
    return conn


async def test_an_idle_connection_ends_on_the_clock_with_close_notify(rig: Rig) -> None:
    server = rig.destination()
    async with rig.open_tunnel(server.port, idle_timeout_s=30.0) as (made, port):
        reader, writer = await _device(port)
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), TIMEOUT_S) == b"ping"
        rig.clock.advance(29.0)
        made.check_timeouts()
        assert made.connections == 1
        rig.clock.advance(1.0)
        made.check_timeouts()
        assert await _read_to_end(reader) == b""
        writer.close()
        served = await server.next_served()  # it read to the end: our close_notify came
        ended = await rig.next_end()
    assert (served.received, served.ended) == (b"ping", "close_notify")
    assert (ended.outcome, ended.up_bytes, ended.down_bytes) == ("idle_timeout", 4, 4)


async def test_quiet_connections_rest_and_time_out_in_the_order_they_went_quiet(rig: Rig) -> None:
    """Only connections that have come due are looked at (each waits in a queue by its last
    activity), so the order must follow activity: a connection that moves again leaves the
    resting ones and gets a new deadline, while those behind it still come due."""
    server = rig.destination()
    async with rig.open_tunnel(server.port, idle_timeout_s=30.0) as (made, port):
        devices = [await _device(port) for _ in range(3)]
        for reader, writer in devices:
            writer.write(b"ping")
            assert await asyncio.wait_for(reader.readexactly(4), TIMEOUT_S) == b"ping"
        rig.clock.advance(1.0)
        made.check_timeouts()
        assert (made.connections, made.resting) == (3, 3)  # quiet: buffers given back
        reader, writer = devices[1]
        writer.write(b"pong")  # at 1 s: its deadline moves to 31 s
        assert await asyncio.wait_for(reader.readexactly(4), TIMEOUT_S) == b"pong"
        assert made.resting == 2
        rig.clock.advance(29.5)  # 30.5 s: the other two are past 30 s
        made.check_timeouts()
        for index in (0, 2):
            assert await _read_to_end(devices[index][0]) == b""
        assert (made.connections, made.resting) == (1, 1)
        rig.clock.advance(0.5)  # 31 s
        made.check_timeouts()
        assert await _read_to_end(reader) == b""
        assert made.connections == 0
        ends = [await rig.next_end() for _ in range(3)]
        for _, writer in devices:
            writer.close()
    assert [end.outcome for end in ends] == ["idle_timeout"] * 3
    assert sorted(end.up_bytes for end in ends) == [4, 4, 8]


async def _pinged_devices(
    port: int, count: int
) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """``count`` devices through the tunnel, each with one round trip done."""
    devices = [await _device(port) for _ in range(count)]
    for reader, writer in devices:
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), TIMEOUT_S) == b"ping"
    return devices


async def test_the_memory_of_a_burst_goes_back_once_it_is_over(rig: Rig) -> None:
    """Many connections set up at once, then quiet: what their handshakes and buffers used is
    given back to the system (malloc_trim), once; a few quiet ones are not worth it."""
    server = rig.destination()
    async with rig.open_tunnel(server.port) as (made, port):
        devices = await _pinged_devices(port, 70)
        made.check_timeouts()
        assert made.trims == 0  # all 70 still busy
        rig.clock.advance(1.0)
        made.check_timeouts()  # all rest: 70 fewer busy than at the peak
        assert (made.resting, made.trims) == (70, 1)
        reader, writer = devices[0]
        writer.write(b"once more")  # one busy again, then quiet: no trim for that
        assert await asyncio.wait_for(reader.readexactly(9), TIMEOUT_S) == b"once more"
        rig.clock.advance(1.0)
        made.check_timeouts()
        assert made.trims == 1
        for _, writer in devices:
            writer.close()


async def test_the_memory_of_a_fleet_that_left_goes_back(rig: Rig) -> None:
    """Quiet connections that end all at once (an outage, a drain) were never busy, yet what
    they held is freed: it goes back too, once, and no more often than every 10 s; a few
    leaving are not worth it."""
    server = rig.destination()
    async with rig.open_tunnel(server.port) as (made, port):
        devices = await _pinged_devices(port, 80)
        rig.clock.advance(1.0)
        made.check_timeouts()
        assert (made.resting, made.trims) == (80, 1)  # the burst of set-ups, over
        leaving, staying = devices[:10], devices[10:]
        for _, writer in leaving:
            writer.close()
        for _ in leaving:
            await rig.next_end()
        rig.clock.advance(11.0)
        made.check_timeouts()
        assert (made.connections, made.trims) == (70, 1)  # 10 of 80 left: kept
        for _, writer in staying[:5]:
            writer.close()
        for _ in range(5):
            await rig.next_end()
        made.check_timeouts()
        assert (made.connections, made.trims) == (65, 1)
        for _, writer in staying[5:]:
            writer.close()
        for _ in staying[5:]:
            await rig.next_end()
        made.check_timeouts()
        assert (made.connections, made.trims) == (0, 2)  # 80 fell to none: given back
        rig.clock.advance(1.0)
        made.check_timeouts()
        assert made.trims == 2


async def test_a_device_reset_ends_the_connection_as_device_lost(rig: Rig) -> None:
    server = rig.destination()
    async with rig.open_tunnel(server.port) as (_, port):
        reader, writer = await _device(port)
        writer.write(b"before the reset")
        assert await asyncio.wait_for(reader.readexactly(16), TIMEOUT_S) == b"before the reset"
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # linger 0: a reset
        ended = await rig.next_end()
        served = await server.next_served()
    assert ended.outcome == "device_lost"
    assert served.received == b"before the reset"
    assert served.ended == "cut"  # not a close_notify: the stream was not complete


async def test_stopping_ends_every_connection_with_close_notify(rig: Rig) -> None:
    server = rig.destination()
    async with rig.open_tunnel(server.port) as (made, port):
        devices = [await _device(port) for _ in range(3)]
        for reader, writer in devices:
            writer.write(b"hold")
            await asyncio.wait_for(reader.readexactly(4), TIMEOUT_S)
        assert made.connections == 3
    ends = [await rig.next_end() for _ in devices]
    served = [await server.next_served() for _ in devices]
    assert [e.outcome for e in ends] == ["shutdown"] * 3
    assert [s.received for s in served] == [b"hold"] * 3
    for reader, writer in devices:
        assert await _read_to_end(reader) == b""
        writer.close()
