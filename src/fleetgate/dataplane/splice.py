"""Joining two endpoints: bytes flow both ways with back-pressure, a half-close is passed on,
and the splice ends when both directions are finished, either side is lost, or nothing moved
for the idle timeout.

Nothing here runs per byte: a received chunk is handed to the other end's ``write`` in the
same callback (optionally through a per-direction transform, such as the MQTT topic mount).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from fleetgate.clock import Clock
from fleetgate.dataplane.endpoint import Endpoint
from fleetgate.dataplane.idle import idle_watch

Transform = Callable[[bytes], bytes]


@dataclass
class SpliceResult:
    up_bytes: int  # device -> destination, as received from the device
    down_bytes: int
    reason: str  # closed | idle_timeout | device_lost | destination_lost | protocol_error


class _Direction:
    """One way through the splice: what ``source`` delivers goes to ``sink``."""

    __slots__ = ("bytes", "done", "sink", "source", "splice", "transform")

    def __init__(
        self, splice: _Splice, source: Endpoint, sink: Endpoint, transform: Transform | None
    ) -> None:
        self.splice = splice
        self.source = source
        self.sink = sink
        self.transform = transform
        self.bytes = 0
        self.done = False

    def data(self, chunk: bytes) -> None:
        self.bytes += len(chunk)
        self.splice.last = self.splice.clock.monotonic()
        if self.transform is not None:
            try:
                chunk = self.transform(chunk)
            except ValueError as exc:  # the transform refuses what it was fed
                self.splice.finish(f"protocol_error: {exc}")
                return
        if chunk:
            self.sink.write(chunk)

    def eof(self) -> None:
        if not self.done:
            self.done = True
            self.sink.write_eof()
        self.splice.check_both_done()


class _Splice:
    """The state of one splice: one small object per relayed connection (an idle gateway
    holds thousands), its callbacks bound methods rather than closures."""

    __slots__ = (
        "clock",
        "destination",
        "device",
        "downward",
        "finished",
        "idle_slot",
        "idle_timeout_s",
        "idle_watch",
        "last",
        "on_done",
        "upward",
    )

    def __init__(
        self,
        device: Endpoint,
        destination: Endpoint,
        clock: Clock,
        idle_timeout_s: float,
        up: Transform | None,
        down: Transform | None,
    ) -> None:
        loop = asyncio.get_running_loop()
        self.device = device
        self.destination = destination
        self.clock = clock
        self.idle_timeout_s = idle_timeout_s
        self.last = clock.monotonic()
        self.finished: asyncio.Future[str] = loop.create_future()
        self.upward = _Direction(self, device, destination, up)
        self.downward = _Direction(self, destination, device, down)
        self.idle_watch = idle_watch(clock)
        self.idle_slot: int | None = None
        self.on_done: Callable[[Splicing, SpliceResult], None] | None = None

    def start(self) -> None:
        upward, downward = self.upward, self.downward
        # Anything a handler read past its own message is sent first.
        for direction in (upward, downward):
            leftover = direction.source.take_buffered()
            if leftover:
                direction.data(leftover)
            if direction.source.at_eof:
                direction.eof()
        device, destination = self.device, self.destination
        device.on_data, device.on_eof = upward.data, upward.eof
        destination.on_data, destination.on_eof = downward.data, downward.eof
        # When one end cannot take more, stop reading the other.
        destination.on_write_paused = device.hold_reading
        device.on_write_paused = destination.hold_reading
        device.on_lost, destination.on_lost = self._device_lost, self._destination_lost
        for side, lost in ((device, self._device_lost), (destination, self._destination_lost)):
            if side.is_closed:
                lost()
        self.check_both_done()
        self.idle_slot = self.idle_watch.watch(self, self.last + self.idle_timeout_s)

    def stop(self) -> None:
        if self.idle_slot is not None:
            self.idle_watch.forget(self, self.idle_slot)
            self.idle_slot = None
        device, destination = self.device, self.destination
        device.on_data = device.on_eof = destination.on_data = destination.on_eof = None
        device.on_write_paused = destination.on_write_paused = None
        device.on_lost = destination.on_lost = None

    def finish(self, reason: str) -> None:
        if not self.finished.done():
            self.finished.set_result(reason)

    def result(self) -> SpliceResult:
        return SpliceResult(self.upward.bytes, self.downward.bytes, self.finished.result())

    def _done(self, _: asyncio.Future[str]) -> None:
        self.stop()
        if self.on_done is not None:
            on_done, self.on_done = self.on_done, None
            on_done(self, self.result())

    def check_both_done(self) -> None:
        if self.upward.done and self.downward.done:
            self.finish("closed")

    # A socket closed under us (reset, or closed after both half-closes).
    def _device_lost(self) -> None:
        self.finish("closed" if self.upward.done and self.downward.done else "device_lost")

    def _destination_lost(self) -> None:
        self.finish("closed" if self.upward.done and self.downward.done else "destination_lost")

    def idle_check(self, now: float) -> None:
        """Its idle deadline came (see ``idle``): end it, or watch for the new deadline."""
        self.idle_slot = None
        if self.finished.done():
            return
        deadline = self.last + self.idle_timeout_s
        if deadline <= now:
            self.finish("idle_timeout")
        else:
            self.idle_slot = self.idle_watch.watch(self, deadline)


Splicing = _Splice  # what start_splice hands back: ``finish(reason)`` ends it early


def start_splice(
    device: Endpoint,
    destination: Endpoint,
    clock: Clock,
    *,
    idle_timeout_s: float,
    on_done: Callable[[Splicing, SpliceResult], None],
) -> Splicing:
    """:func:`splice` without a coroutine waiting on it: ``on_done`` gets the result (and
    closes the endpoints). For relays that hold many idle connections and have nothing else
    to do for them: no task and no frames per connection."""
    state = _Splice(device, destination, clock, idle_timeout_s, None, None)
    state.on_done = on_done
    state.finished.add_done_callback(state._done)
    state.start()
    return state


async def splice(
    device: Endpoint,
    destination: Endpoint,
    clock: Clock,
    *,
    idle_timeout_s: float,
    up: Transform | None = None,
    down: Transform | None = None,
) -> SpliceResult:
    """Relay until both directions end. The caller closes both endpoints afterwards."""
    state = _Splice(device, destination, clock, idle_timeout_s, up, down)
    state.start()
    try:
        reason = await state.finished
    finally:
        state.stop()
    return SpliceResult(state.upward.bytes, state.downward.bytes, reason)
