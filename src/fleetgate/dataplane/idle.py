"""Idle deadlines of every relayed connection of an event loop, on one timer.

A timer per connection costs about 600 bytes in uvloop (handle, libuv timer, context copy); an
idle gateway holds tens of thousands of connections. Here each connection sits in the one-second
slot of its deadline, and one timer wakes for the earliest slot. Activity does not move a
connection: when its slot comes, it looks at when it last moved and either ends or takes the
slot of its new deadline. A deadline is never early, and at most ``SLOT_S`` late.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import weakref
from typing import Protocol

from fleetgate.clock import Clock

SLOT_S = 1.0


class Watched(Protocol):
    def idle_check(self, now: float) -> None:
        """Called when the watched deadline has come (``now`` on the clock's monotonic scale);
        :meth:`IdleWatch.watch` again to be called at a later one."""


class IdleWatch:
    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._slots: dict[int, set[Watched]] = {}
        self._heap: list[int] = []  # slots with members, soonest first (may hold stale ones)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_slot: int | None = None

    def __len__(self) -> int:
        return sum(len(members) for members in self._slots.values())

    def watch(self, item: Watched, deadline: float) -> int:
        """Call ``item.idle_check`` once ``deadline`` has passed; the slot, for :meth:`forget`."""
        slot = math.ceil(deadline / SLOT_S)
        members = self._slots.get(slot)
        if members is None:
            members = self._slots[slot] = set()
            heapq.heappush(self._heap, slot)
        members.add(item)
        if self._timer_slot is None or slot < self._timer_slot:
            self._arm(slot)
        return slot

    def forget(self, item: Watched, slot: int) -> None:
        members = self._slots.get(slot)
        if members is not None:
            members.discard(item)
            if not members:
                del self._slots[slot]  # its heap entry is dropped when it comes up

    def tick(self) -> None:
        """Check every connection whose slot has come."""
        self._timer = self._timer_slot = None
        now = self.clock.monotonic()
        while self._heap and self._heap[0] * SLOT_S <= now:
            for item in self._slots.pop(heapq.heappop(self._heap), ()):
                item.idle_check(now)
        while self._heap and self._heap[0] not in self._slots:
            heapq.heappop(self._heap)
        if self._heap:
            self._arm(self._heap[0])

    def _arm(self, slot: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        delay = max(slot * SLOT_S - self.clock.monotonic(), 0.0)
        self._timer = asyncio.get_running_loop().call_later(delay, self.tick)
        self._timer_slot = slot


_watches: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[int, IdleWatch]] = (
    weakref.WeakKeyDictionary()
)


def idle_watch(clock: Clock) -> IdleWatch:
    """The running loop's watch for deadlines on ``clock``."""
    per_clock = _watches.setdefault(asyncio.get_running_loop(), {})
    watch = per_clock.get(id(clock))
    if watch is None or watch.clock is not clock:
        watch = per_clock[id(clock)] = IdleWatch(clock)
    return watch
