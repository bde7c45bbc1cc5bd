"""The set of configured listeners: start, reconcile on reload, drain on shutdown."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from fleetgate.clock import Clock
from fleetgate.config.schema import ListenerConfig
from fleetgate.dataplane.listener import DeviceLookup, TcpListener
from fleetgate.health import Health
from fleetgate.logs import get_logger
from fleetgate.metrics import Metrics
from fleetgate.records import Device, DeviceStatus
from fleetgate.store.changes import Change

log = get_logger("fleetgate.dataplane")
DeviceFinder = Callable[[str], Awaitable[Device | None]]


class ListenerSet:
    def __init__(
        self, lookup: DeviceLookup, metrics: Metrics, clock: Clock, health: Health
    ) -> None:
        self._lookup = lookup
        self._metrics = metrics
        self._clock = clock
        self._health = health
        self._listeners: dict[str, TcpListener] = {}
        self._retired: list[TcpListener] = []

    def get(self, name: str) -> TcpListener | None:
        return self._listeners.get(name)

    async def _start(self, name: str, config: ListenerConfig) -> None:
        listener = TcpListener(name, config, self._lookup, self._metrics, self._clock)
        try:
            await listener.start()
        except OSError as exc:
            self._health.listeners[name] = f"cannot bind {config.bind}: {exc.strerror or exc}"
            log.error("listener.bind_failed", listener=name, bind=config.bind, detail=str(exc))
            return
        self._listeners[name] = listener
        self._health.listeners[name] = "bound"

    async def apply(self, configs: Mapping[str, ListenerConfig]) -> None:
        """Make the running listeners match ``configs``.

        A removed or changed listener stops accepting; its live connections carry on under the
        old settings until they end (they are cut only at shutdown).
        """
        for name in list(self._listeners):
            if configs.get(name) != self._listeners[name].config:
                old = self._listeners.pop(name)
                await old.stop_accepting()
                self._retired.append(old)
                self._health.listeners.pop(name, None)
        for name in [n for n in list(self._health.listeners) if n not in configs]:
            self._health.listeners.pop(name, None)
        for name, config in configs.items():
            if name not in self._listeners:
                await self._start(name, config)

    async def on_change(self, change: Change, find: DeviceFinder) -> None:
        """Cut the live connections a registry change no longer allows (within the poll
        interval of the change follower, on every process)."""
        if change.target_type != "device":
            return
        everyone = [*self._listeners.values(), *self._retired]
        if not any(change.target_id in lst.devices_connected() for lst in everyone):
            return
        device = await find(change.target_id)
        keep: tuple[str, ...]
        if device is None:
            reason, keep = "device_deleted", ()
        elif device.status is not DeviceStatus.ENABLED:
            reason, keep = "device_disabled", ()
        else:
            reason, keep = "address_removed", device.addresses
        for listener in everyone:
            listener.cut(change.target_id, reason, keep_sources=keep)

    async def close(self, drain_timeout_s: float) -> None:
        everyone = [*self._listeners.values(), *self._retired]
        for listener in everyone:
            await listener.stop_accepting()
        for listener in everyone:
            await listener.drain(drain_timeout_s)
        self._listeners.clear()
        self._retired.clear()
