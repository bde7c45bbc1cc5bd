"""The splice's idle timeout, on real sockets (two socket pairs: the device and the destination
each talk to an endpoint of the splice) with a clock the test moves and the loop's idle watch
ticked by hand."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from fleetgate.clock import FakeClock
from fleetgate.dataplane.endpoint import PlainEndpoint
from fleetgate.dataplane.idle import SLOT_S, IdleWatch, idle_watch
from fleetgate.dataplane.splice import SpliceResult, splice


@dataclass
class Relay:
    device: socket.socket  # the device's own end
    destination: socket.socket  # the destination's own end
    task: asyncio.Task[SpliceResult]
    clock: FakeClock
    watch: IdleWatch


async def _endpoint(sock: socket.socket) -> PlainEndpoint:
    _, endpoint = await asyncio.get_running_loop().connect_accepted_socket(PlainEndpoint, sock)
    return endpoint


@pytest.fixture
async def relay() -> AsyncIterator[Relay]:
    device_side, device = socket.socketpair()
    destination_side, destination = socket.socketpair()
    for sock in (device, destination):
        sock.setblocking(False)
    clock = FakeClock()
    inner, outer = await _endpoint(device_side), await _endpoint(destination_side)
    task = asyncio.get_running_loop().create_task(splice(inner, outer, clock, idle_timeout_s=10.0))
    await asyncio.sleep(0)  # the splice starts and takes its slot
    yield Relay(device, destination, task, clock, idle_watch(clock))
    task.cancel()
    inner.close()
    outer.close()
    device.close()
    destination.close()


async def test_a_connection_ends_when_nothing_moved_for_the_idle_timeout(relay: Relay) -> None:
    assert len(relay.watch) == 1
    relay.clock.advance(9.0)
    relay.watch.tick()
    assert not relay.task.done()

    relay.device.send(b"ping")  # activity at 9 s: the deadline moves to 19 s
    loop = asyncio.get_running_loop()
    assert await loop.sock_recv(relay.destination, 16) == b"ping"
    relay.clock.advance(5.0)
    relay.watch.tick()  # 14 s: the old deadline has passed, the new one has not
    assert not relay.task.done()
    assert len(relay.watch) == 1

    relay.clock.advance(5.0 + SLOT_S)
    relay.watch.tick()
    result = await relay.task
    assert (result.reason, result.up_bytes, result.down_bytes) == ("idle_timeout", 4, 0)
    assert len(relay.watch) == 0


async def test_a_finished_splice_leaves_the_watch_at_once(relay: Relay) -> None:
    relay.device.shutdown(socket.SHUT_WR)
    relay.destination.shutdown(socket.SHUT_WR)
    result = await relay.task
    assert result.reason == "closed"
    # Not kept (with its endpoints) until its deadline comes.
    assert len(relay.watch) == 0


async def test_the_watch_wakes_on_the_loop_for_its_soonest_slot(relay: Relay) -> None:
    # No hand-made tick: a member with an earlier deadline than the splice's re-arms the
    # watch's loop timer for its slot, which is already past on the moved clock; the tick it
    # makes finds the splice's deadline past too.
    relay.clock.advance(30.0)
    relay.watch.watch(_Nudge(), 1.0)
    result = await asyncio.wait_for(relay.task, 5.0)
    assert result.reason == "idle_timeout"
    assert len(relay.watch) == 0


class _Nudge:
    """A member that asks for nothing more once its deadline came."""

    def idle_check(self, now: float) -> None:
        pass
