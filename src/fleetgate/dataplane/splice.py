"""Joining two endpoints: bytes flow both ways with back-pressure, a half-close is passed on,
and the splice ends when both directions are finished, either side is lost, or nothing moved
for the idle timeout.

Nothing here runs per byte: a received chunk is handed to the other end's ``write`` in the
same callback (optionally through a per-direction transform, such as the MQTT topic mount).
Without transforms, the chunks do not even come here. A device (plain or TLS) and a TLS
destination are handed over to the loop's tunnel core (``handover``), which relays them in C to
their end; other pairs are relayed by the compiled relay (``fastpath``) on their transports,
and only the events (ends, losses, flow control) reach this module.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fleetgate.clock import Clock
from fleetgate.dataplane import fastpath, handover
from fleetgate.dataplane.endpoint import Endpoint
from fleetgate.dataplane.idle import idle_watch

if TYPE_CHECKING:
    from fleetgate.dataplane._relay import Pipe
    from fleetgate.dataplane.handover import Handover, Outcome

Transform = Callable[[bytes], bytes]


@dataclass
class SpliceResult:
    up_bytes: int  # device -> destination, as received from the device
    down_bytes: int
    reason: str  # closed | idle_timeout | device_lost | destination_lost | protocol_error
    relay: str = "python"  # what moved the bytes: core (handed over), compiled, python


class _Splice:
    """The state of one splice: one small object per relayed connection (an idle gateway
    holds thousands). Its callbacks are its bound methods, held by the endpoints only while
    it runs: once stopped, nothing refers back to it, so it and both endpoints (with their
    OpenSSL objects) are freed at once, not at the next full garbage collection."""

    __slots__ = (
        "clock",
        "destination",
        "device",
        "down_bytes",
        "down_done",
        "down_transform",
        "finished",
        "handover",
        "idle_slot",
        "idle_timeout_s",
        "idle_watch",
        "last",
        "on_done",
        "pipes",
        "relay",
        "up_bytes",
        "up_done",
        "up_transform",
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
        self.device = device
        self.destination = destination
        self.clock = clock
        self.idle_timeout_s = idle_timeout_s
        self.last = clock.monotonic()
        self.finished: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.up_transform, self.down_transform = up, down
        self.up_bytes = self.down_bytes = 0
        self.up_done = self.down_done = False
        self.idle_watch = idle_watch(clock)
        self.idle_slot: int | None = None
        self.on_done: Callable[[Splicing, SpliceResult], None] | None = None
        self.pipes: tuple[Pipe, Pipe] | None = None
        self.handover: Handover | None = None
        self.relay = "python"  # what moves the bytes (see SpliceResult)

    def start(self) -> None:
        device, destination = self.device, self.destination
        # Anything a handler read past its own message is sent first.
        leftover = device.take_buffered()
        if leftover:
            self._up_data(leftover)
        if device.at_eof:
            self._up_eof()
        leftover = destination.take_buffered()
        if leftover:
            self._down_data(leftover)
        if destination.at_eof:
            self._down_eof()
        device.on_data, device.on_eof = self._up_data, self._up_eof
        destination.on_data, destination.on_eof = self._down_data, self._down_eof
        # When one end cannot take more, stop reading the other.
        destination.on_write_paused = device.hold_reading
        device.on_write_paused = destination.hold_reading
        device.on_lost, destination.on_lost = self._device_lost, self._destination_lost
        if device.is_closed:
            self._device_lost()
        if destination.is_closed:
            self._destination_lost()
        self._check_both_done()
        if self.up_transform is None and self.down_transform is None and not self.finished.done():
            peer = device.peer_address()
            self.handover = handover.take(
                device,
                destination,
                self.clock,
                source=peer[0] if peer else "?",
                idle_timeout_s=self.idle_timeout_s,
                on_end=self._handed_over_end,
            )
            if self.handover is not None:
                self.relay = "core"
                return  # the core relays it to its end, idle timeout included
            self.pipes = fastpath.attach(device, destination, self.clock)
            if self.pipes is not None:
                self.relay = "compiled"
        self.idle_slot = self.idle_watch.watch(self, self.last + self.idle_timeout_s)

    def stop(self) -> None:
        if self.handover is not None:
            self.handover.cut("cancelled")  # (if it is still live: cancelled, or a cut)
        if self.idle_slot is not None:
            self.idle_watch.forget(self, self.idle_slot)
            self.idle_slot = None
        if self.pipes is not None:
            pipes, self.pipes = self.pipes, None
            fastpath.detach(pipes)
            self._catch_up(pipes)
            self.up_bytes += pipes[0].received
            self.down_bytes += pipes[1].received
        device, destination = self.device, self.destination
        device.on_data = device.on_eof = destination.on_data = destination.on_eof = None
        device.on_write_paused = destination.on_write_paused = None
        device.on_lost = destination.on_lost = None

    def _handed_over_end(self, outcome: Outcome) -> None:
        self.up_bytes += outcome.up_bytes
        self.down_bytes += outcome.down_bytes
        self.finish(outcome.reason)

    def finish(self, reason: str) -> None:
        if not self.finished.done():
            self.finished.set_result(reason)

    def result(self) -> SpliceResult:
        return SpliceResult(self.up_bytes, self.down_bytes, self.finished.result(), self.relay)

    # -- the two directions ---------------------------------------------------------------------

    def _up_data(self, chunk: bytes) -> None:
        self.up_bytes += len(chunk)
        self._relay(chunk, self.up_transform, self.destination)

    def _down_data(self, chunk: bytes) -> None:
        self.down_bytes += len(chunk)
        self._relay(chunk, self.down_transform, self.device)

    def _relay(self, chunk: bytes, transform: Transform | None, sink: Endpoint) -> None:
        self.last = self.clock.monotonic()
        if transform is not None:
            try:
                chunk = transform(chunk)
            except ValueError as exc:  # the transform refuses what it was fed
                self.finish(f"protocol_error: {exc}")
                return
        if chunk:
            sink.write(chunk)

    def _up_eof(self) -> None:
        if not self.up_done:
            self.up_done = True
            self.destination.write_eof()
        self._check_both_done()

    def _down_eof(self) -> None:
        if not self.down_done:
            self.down_done = True
            self.device.write_eof()
        self._check_both_done()

    def _check_both_done(self) -> None:
        if self.up_done and self.down_done:
            self.finish("closed")

    # A socket closed under us (reset, or closed after both half-closes).
    def _device_lost(self) -> None:
        self.finish("closed" if self.up_done and self.down_done else "device_lost")

    def _destination_lost(self) -> None:
        self.finish("closed" if self.up_done and self.down_done else "destination_lost")

    def idle_check(self, now: float) -> None:
        """Its idle deadline came (see ``idle``): end it, or watch for the new deadline."""
        self.idle_slot = None
        if self.finished.done():
            return
        if self.pipes is not None:
            self._catch_up(self.pipes)
        deadline = self.last + self.idle_timeout_s
        if deadline <= now:
            self.finish("idle_timeout")
        else:
            self.idle_slot = self.idle_watch.watch(self, deadline)

    def _catch_up(self, pipes: tuple[Pipe, Pipe]) -> None:
        """Data the compiled relay moved counts as activity too."""
        self.last = max(self.last, pipes[0].last, pipes[1].last)

    def _done(self, _: asyncio.Future[str]) -> None:
        try:
            self.stop()
        finally:  # whoever waits for the end hears of it, whatever stopping raised
            if self.on_done is not None:
                on_done, self.on_done = self.on_done, None
                on_done(self, self.result())


Splicing = _Splice  # what start_splice hands back: ``finish(reason)`` ends it early


def start_splice(
    device: Endpoint,
    destination: Endpoint,
    clock: Clock,
    *,
    idle_timeout_s: float,
    on_done: Callable[[Splicing, SpliceResult], None],
    up: Transform | None = None,
    down: Transform | None = None,
) -> Splicing:
    """:func:`splice` without a coroutine waiting on it: ``on_done`` gets the result (and
    closes the endpoints). For relays that hold many idle connections and have nothing else
    to do for them: no task and no frames per connection."""
    state = _Splice(device, destination, clock, idle_timeout_s, up, down)
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
    return SpliceResult(state.up_bytes, state.down_bytes, reason, state.relay)
