"""The compiled relay (``_relay`` through ``fastpath``) against the Python one: the same bytes,
the same counts, the same half-closes, flow control and failure causes.

Every test runs twice, with the compiled relay and with it switched off; three also run on uvloop
(the gateway's loop), whose sockets the compiled relay writes directly. The rig is
``support.splice_rig``'s. The tunnel core, which takes such connections over where it is built,
is switched off here (its own tests: ``test_handover``).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import uvloop

from fleetgate.clock import FakeClock
from fleetgate.dataplane import fastpath, handover
from fleetgate.dataplane.endpoint import PlainEndpoint
from fleetgate.dataplane.idle import idle_watch
from fleetgate.dataplane.splice import SpliceResult
from fleetgate.dataplane.tls_endpoint import TlsEndpoint
from support.splice_rig import (
    WARM_UP,
    Rig,
    assert_destination_lost,
    broken_record,
    exchange,
    reset,
    reset_seen_by,
    splice_rig,
)


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


@pytest.fixture(autouse=True)
def _no_handover(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handover, "ENABLED", False)


@pytest.fixture(params=["compiled", "python"])
async def rig(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Rig]:
    compiled = request.param == "compiled"
    monkeypatch.setattr(fastpath, "ENABLED", compiled)
    async with splice_rig(tmp_path, compiled) as made:
        yield made


def _relays_in_c(rig: Rig) -> bool:
    assert rig.device_end.transport is not None
    return type(rig.device_end.transport.get_protocol()).__name__ == "Pipe"


async def test_messages_cross_both_ways_and_each_half_close_is_passed_on(rig: Rig) -> None:
    rig.start(FakeClock())
    moved = await exchange(rig, WARM_UP + 4)
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
    relay = "compiled" if rig.compiled else "python"
    assert result == SpliceResult(moved, moved + len(b"last words"), "closed", relay)
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
    await exchange(rig, WARM_UP)

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


@pytest.mark.parametrize(
    ("breaking", "cause"),
    [(broken_record, "bad_record_mac"), (reset, None)],
    ids=["broken-record", "reset"],
)
async def test_a_broken_destination_ends_the_splice_with_the_same_cause(
    rig: Rig, breaking: Callable[[Rig], Awaitable[None]], cause: str | None
) -> None:
    rig.start(FakeClock())
    moved = await exchange(rig, WARM_UP + 2)
    await breaking(rig)
    tail = b"tail" if cause else b""
    assert await rig.receive_to_end() == tail  # and the device's connection ends with it
    result = await asyncio.wait_for(rig.done, 10)
    assert_destination_lost(rig, result, moved, tail, cause)


async def test_a_reset_that_a_relayed_write_meets_keeps_its_cause(rig: Rig) -> None:
    """A TLS 1.3 server that refuses our certificate closes with our bytes unread: a reset.
    When a relayed write is the first to meet it (the kernel reports it once), the endpoint
    must still learn it was a reset right after the handshake."""
    rig.start(FakeClock())
    transport = rig.destination.transport
    assert transport is not None
    transport.pause_reading()  # a write meets the reset, not a read
    await reset(rig)
    await reset_seen_by(transport.get_extra_info("socket"))
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
    await exchange(rig, WARM_UP)
    clock.advance(50.0)
    await exchange(rig, 1)  # at 50 s: the deadline moves to 110 s
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
        async with splice_rig(tmp_path, compiled=True) as rig:
            assert type(rig.device_end.transport).__module__ == "uvloop.loop"
            if case == "large-transfer":
                await test_a_large_transfer_arrives_whole_through_flow_control(rig, monkeypatch)
            elif case == "reset":
                await test_a_reset_that_a_relayed_write_meets_keeps_its_cause(rig)
            else:
                await test_messages_cross_both_ways_and_each_half_close_is_passed_on(rig)

    uvloop.run(run())
