"""Copying bytes both ways with back-pressure, honouring half-close, until both sides finish."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from fleetgate.clock import Clock

CHUNK_BYTES = 64 * 1024


@dataclass
class RelayStats:
    up_bytes: int = 0  # device -> destination
    down_bytes: int = 0  # destination -> device
    last_activity: float = 0.0


async def _pump(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    stats: RelayStats,
    clock: Clock,
    *,
    upstream: bool,
) -> None:
    try:
        while chunk := await reader.read(CHUNK_BYTES):
            writer.write(chunk)
            await writer.drain()  # back-pressure: never read faster than the other side takes
            stats.last_activity = clock.monotonic()
            if upstream:
                stats.up_bytes += len(chunk)
            else:
                stats.down_bytes += len(chunk)
        # The source finished sending: pass the half-close on, keep the other direction open.
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.transport.abort()


async def _watch_idle(stats: RelayStats, clock: Clock, idle_timeout_s: float) -> None:
    while True:
        remaining = stats.last_activity + idle_timeout_s - clock.monotonic()
        if remaining <= 0:
            return
        await asyncio.sleep(remaining)


async def relay(
    device: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    destination: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    clock: Clock,
    *,
    idle_timeout_s: float,
) -> tuple[RelayStats, str]:
    """Relay until both directions end (``"closed"``) or nothing moves for the idle timeout."""
    stats = RelayStats(last_activity=clock.monotonic())
    reason = "closed"
    async with asyncio.TaskGroup() as tg:
        up = tg.create_task(_pump(device[0], destination[1], stats, clock, upstream=True))
        down = tg.create_task(_pump(destination[0], device[1], stats, clock, upstream=False))

        async def watchdog() -> None:
            nonlocal reason
            await _watch_idle(stats, clock, idle_timeout_s)
            reason = "idle_timeout"
            up.cancel()
            down.cancel()

        guard = tg.create_task(watchdog())
        await asyncio.wait((up, down))
        guard.cancel()
    return stats, reason
