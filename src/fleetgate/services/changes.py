"""Telling every process about every change within about a second.

Each process follows the audit log (every change writes an entry in its own transaction) from
where it started. PostgreSQL wakes followers at once with NOTIFY; SQLite is polled, cheaply, on
an index. Ids on PostgreSQL may commit out of order, so a missing id is waited for a while
before the follower moves past it (a rolled-back transaction leaves such a hole for good).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from fleetgate.clock import Clock
from fleetgate.logs import get_logger
from fleetgate.store import Database
from fleetgate.store.changes import Change, ChangeRepo

log = get_logger("fleetgate.changes")
Handler = Callable[[Change], Awaitable[None]]
BATCH = 1000


class ChangeFollower:
    def __init__(
        self,
        db: Database,
        clock: Clock,
        *,
        poll_interval_s: float = 0.5,
        gap_timeout_s: float = 10.0,
    ) -> None:
        self._db = db
        self._clock = clock
        self._poll_interval_s = poll_interval_s
        self._gap_timeout_s = gap_timeout_s
        self._handlers: list[Handler] = []
        self._wake = asyncio.Event()
        self.watermark = 0  # every id up to here was handled (or given up on)
        self._seen: set[int] = set()  # handled ids above the watermark
        self._gap_since: float | None = None
        self._lock = asyncio.Lock()  # one poll at a time: a caught-up caller saw it all handled

    def subscribe(self, handler: Handler) -> None:
        self._handlers.append(handler)

    def wake(self) -> None:
        self._wake.set()

    async def start_from_now(self) -> None:
        async with self._db.snapshot() as tx:
            self.watermark = await ChangeRepo(tx).latest_id()

    async def poll_once(self) -> list[Change]:
        """Handle every change not yet handled; the ones handled now."""
        async with self._lock:
            return await self._poll()

    async def _poll(self) -> list[Change]:
        async with self._db.snapshot() as tx:
            fresh = await ChangeRepo(tx).after(self.watermark, limit=BATCH)
        handled = []
        for change in fresh:
            if change.id in self._seen:
                continue
            self._seen.add(change.id)
            handled.append(change)
            for handler in self._handlers:
                try:
                    await handler(change)
                except Exception as exc:  # noqa: BLE001 - one subscriber must not stop the rest
                    log.error("changes.handler_failed", change=change.id, detail=str(exc))
        self._advance()
        return handled

    def _advance(self) -> None:
        while self.watermark + 1 in self._seen:
            self.watermark += 1
            self._seen.discard(self.watermark)
        if not self._seen:
            self._gap_since = None
            return
        now = self._clock.monotonic()
        if self._gap_since is None:
            self._gap_since = now
        elif now - self._gap_since >= self._gap_timeout_s:
            log.info("changes.gap_skipped", id=self.watermark + 1)
            self.watermark += 1
            self._gap_since = None
            self._advance()

    async def run(self) -> None:
        """Follow until cancelled."""
        async with self._db.watch_changes(self.wake):
            while True:
                try:
                    await self.poll_once()
                except Exception as exc:  # noqa: BLE001 - keep following through store hiccups
                    log.error("changes.poll_failed", detail=str(exc))
                try:
                    async with asyncio.timeout(self._poll_interval_s):
                        await self._wake.wait()
                except TimeoutError:
                    pass
                self._wake.clear()
