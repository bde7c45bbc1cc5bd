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

Transform = Callable[[bytes], bytes]


@dataclass
class SpliceResult:
    up_bytes: int  # device -> destination, as received from the device
    down_bytes: int
    reason: str  # closed | idle_timeout | device_lost | destination_lost | protocol_error


class _Direction:
    def __init__(
        self,
        source: Endpoint,
        sink: Endpoint,
        transform: Transform | None,
        on_activity: Callable[[], None],
        on_error: Callable[[BaseException], None],
    ) -> None:
        self.source = source
        self.sink = sink
        self.transform = transform
        self.bytes = 0
        self.done = False
        self._activity = on_activity
        self._error = on_error

    def data(self, chunk: bytes) -> None:
        self.bytes += len(chunk)
        self._activity()
        if self.transform is not None:
            try:
                chunk = self.transform(chunk)
            except ValueError as exc:  # the transform refuses what it was fed
                self._error(exc)
                return
        if chunk:
            self.sink.write(chunk)

    def eof(self) -> None:
        if not self.done:
            self.done = True
            self.sink.write_eof()


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
    loop = asyncio.get_running_loop()
    finished: asyncio.Future[str] = loop.create_future()
    last = clock.monotonic()

    def touch() -> None:
        nonlocal last
        last = clock.monotonic()

    def finish(reason: str) -> None:
        if not finished.done():
            finished.set_result(reason)

    def protocol_error(exc: BaseException) -> None:
        finish(f"protocol_error: {exc}")

    upward = _Direction(device, destination, up, touch, protocol_error)
    downward = _Direction(destination, device, down, touch, protocol_error)

    def on_eof(direction: _Direction) -> Callable[[], None]:
        def handler() -> None:
            direction.eof()
            if upward.done and downward.done:
                finish("closed")

        return handler

    # Anything a handler read past its own message is sent first.
    for direction in (upward, downward):
        leftover = direction.source.take_buffered()
        if leftover:
            direction.data(leftover)
        if direction.source.at_eof:
            direction.eof()

    device.on_data, device.on_eof = upward.data, on_eof(upward)
    destination.on_data, destination.on_eof = downward.data, on_eof(downward)
    # When one end cannot take more, stop reading the other.
    destination.on_write_paused = device.hold_reading
    device.on_write_paused = destination.hold_reading

    def lost(which: str) -> Callable[[asyncio.Future[None]], None]:
        def handler(_: asyncio.Future[None]) -> None:
            # A socket closed under us (reset, or closed after both half-closes).
            finish("closed" if upward.done and downward.done else f"{which}_lost")

        return handler

    device.closed.add_done_callback(lost("device"))
    destination.closed.add_done_callback(lost("destination"))
    if upward.done and downward.done:
        finish("closed")

    def check_idle() -> None:
        if finished.done():
            return
        remaining = last + idle_timeout_s - clock.monotonic()
        if remaining <= 0:
            finish("idle_timeout")
        else:
            timers[0] = loop.call_later(max(remaining, 0.05), check_idle)

    timers = [loop.call_later(idle_timeout_s, check_idle)]
    try:
        reason = await finished
    finally:
        timers[0].cancel()
        device.on_data = device.on_eof = destination.on_data = destination.on_eof = None
        device.on_write_paused = destination.on_write_paused = None
    return SpliceResult(upward.bytes, downward.bytes, reason)
