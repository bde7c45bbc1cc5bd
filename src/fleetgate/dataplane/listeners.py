"""The set of configured listeners over one data path: start, reconcile on reload, follow the
change feed (cache invalidation, cutting what the registry no longer allows), drain."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping
from functools import partial
from typing import Protocol

from fleetgate.clock import Clock
from fleetgate.config.schema import DestinationConfig, ListenerConfig
from fleetgate.dataplane.affinity import PortSharing
from fleetgate.dataplane.datapath import DataPath
from fleetgate.dataplane.http_upstream import HttpUpstream
from fleetgate.dataplane.listener import Handler, ListenerLoad, StreamListener
from fleetgate.dataplane.proxy_http import make_http_handler
from fleetgate.dataplane.proxy_mqtt import serve_mqtt
from fleetgate.dataplane.proxy_tcp import serve_tcp
from fleetgate.dataplane.proxy_udp import UdpListener
from fleetgate.dataplane.psk import PskTable
from fleetgate.dataplane.registry import RegistryView
from fleetgate.dataplane.server_tls import ServerTls, TlsSetupError
from fleetgate.dataplane.upstream import Upstream
from fleetgate.errors import FleetgateError
from fleetgate.health import Health
from fleetgate.logs import get_logger
from fleetgate.metrics import Metrics
from fleetgate.records import DeviceStatus, NewAuditEntry
from fleetgate.services.bundle import Services
from fleetgate.services.context import SYSTEM_CALLER
from fleetgate.store.audit import AuditRepo
from fleetgate.store.changes import Change

log = get_logger("fleetgate.dataplane")
FILE_CHECK_S = 2.0


class Listener(Protocol):
    name: str
    config: ListenerConfig

    @property
    def active(self) -> int: ...
    @property
    def bound_addresses(self) -> list[tuple[str, int]]: ...
    async def start(self) -> None: ...
    async def stop_accepting(self) -> None: ...
    async def drain(self, timeout_s: float) -> None: ...
    def devices_connected(self) -> set[str]: ...
    def cut(
        self,
        device_id: str,
        reason: str,
        *,
        keep_sources: tuple[str, ...] | None = None,
        credential: str | None = None,
    ) -> int: ...
    def cut_certificate(self, serial: str) -> list[str]: ...


class ListenerSet:
    def __init__(
        self,
        services: Services,
        metrics: Metrics,
        clock: Clock,
        health: Health,
        *,
        sharing: PortSharing | None = None,
    ) -> None:
        self._services = services
        self._clock = clock
        self._health = health
        self._sharing = sharing  # None: this process alone serves the listeners
        self.keys = PskTable(services)
        self.path = DataPath(
            RegistryView(services, clock), Upstream(clock), {}, clock, metrics, self.keys
        )
        self.http = HttpUpstream(self.path, clock)
        self._handlers: dict[str, Handler] = {
            "tcp": serve_tcp,
            "mqtt": serve_mqtt,
            "http": make_http_handler(self.http),
        }
        self._listeners: dict[str, Listener] = {}
        self._retired: list[Listener] = []
        # Per listener name, what its instances hold together (a reload's retired instance
        # and its successor count against the same caps).
        self._loads: dict[str, ListenerLoad] = {}
        self._watching: asyncio.Task[None] | None = None

    def get(self, name: str) -> Listener | None:
        return self._listeners.get(name)

    def _make(self, name: str, config: ListenerConfig) -> Listener:
        load = self._loads.setdefault(name, ListenerLoad())
        if config.protocol == "udp":
            return UdpListener(name, config, self.path, self.http, sharing=self._sharing, load=load)
        return StreamListener(
            name,
            config,
            self.path,
            self._handlers[config.protocol],
            sharing=self._sharing,
            tls=(
                ServerTls(name, config.tls, self._services, self.keys, self._clock)
                if config.tls is not None
                else None
            ),
            load=load,
        )

    async def _tls_usable(self, name: str, config: ListenerConfig) -> bool:
        """Whether a changed listener's new TLS material loads (before the old one stops)."""
        if config.tls is None:
            return True
        try:
            await ServerTls(name, config.tls, self._services, self.keys, self._clock).load()
        except TlsSetupError as exc:
            log.error(
                "listener.tls_failed",
                listener=name,
                detail=str(exc),
                kept="the running listener and its previous settings",
            )
            return False
        return True

    async def _start(self, name: str, config: ListenerConfig) -> None:
        listener = self._make(name, config)
        try:
            await listener.start()
        except OSError as exc:
            self._health.listeners[name] = f"cannot bind {config.bind}: {exc.strerror or exc}"
            log.error("listener.bind_failed", listener=name, bind=config.bind, detail=str(exc))
            return
        except TlsSetupError as exc:
            self._health.listeners[name] = f"TLS unusable: {exc}"
            log.error("listener.tls_failed", listener=name, detail=str(exc))
            return
        self._listeners[name] = listener
        self._health.listeners[name] = "bound"

    async def apply(
        self,
        configs: Mapping[str, ListenerConfig],
        destinations: Mapping[str, DestinationConfig] | None = None,
    ) -> None:
        """Make the running listeners match ``configs`` (and the data path ``destinations``).

        A removed or changed listener stops accepting; its live connections carry on under the
        old settings until they end (they are cut only at shutdown). Changed destinations apply
        to new connections.
        """
        self.path.reconfigure(destinations or {})
        if any(c.tls is not None and c.tls.mode == "psk" for c in configs.values()):
            await self._psk_change()
        # Listeners retired by earlier reloads are forgotten once their last connection ended.
        self._retired = [old for old in self._retired if old.active]
        named = {old.name for old in self._retired} | set(configs)
        self._loads = {name: load for name, load in self._loads.items() if name in named}
        running_before = set(self._listeners)
        for name in list(self._listeners):
            fresh = configs.get(name)
            if fresh != self._listeners[name].config:
                if fresh is not None and not await self._tls_usable(name, fresh):
                    continue  # the running listener stays, with its old settings
                old = self._listeners.pop(name)
                await old.stop_accepting()
                self._retired.append(old)
                self._health.listeners.pop(name, None)
        for name in [n for n in list(self._health.listeners) if n not in configs]:
            self._health.listeners.pop(name, None)
        for name, config in configs.items():
            if name not in self._listeners:
                await self._start(name, config)
        # Unchanged listeners read their TLS material again: files, CAs and CRLs may have
        # changed without the configuration changing.
        kept = running_before & set(self._listeners)
        await self._reload_tls(lambda tls: tls.listener in kept, "reload")
        if self._watching is None and any(
            lst.config.tls is not None for lst in self._listeners.values()
        ):
            self._watching = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        """Every ``FILE_CHECK_S``: reload a listener whose certificate or key file changed
        (renewals by outside tools need no signal), and renew OCSP staples that are half
        through their validity."""
        while True:
            await asyncio.sleep(FILE_CHECK_S)
            await self._reload_tls(ServerTls.files_changed, "file changed")
            await self._refresh_staples(partial(ServerTls.staple_due, now=self._clock.now()))

    async def _refresh_staples(self, which: Callable[[ServerTls], bool]) -> None:
        for listener in self._listeners.values():
            tls = getattr(listener, "tls", None)
            if isinstance(tls, ServerTls) and which(tls):
                try:
                    await tls.refresh_staple()
                except FleetgateError as exc:  # the store is away: the old staple stands
                    log.error("listener.ocsp_staple_failed", listener=tls.listener, detail=str(exc))

    async def _reload_tls(self, which: Callable[[ServerTls], bool], why: str) -> None:
        for listener in self._listeners.values():
            tls = getattr(listener, "tls", None)
            if isinstance(tls, ServerTls) and which(tls):
                await tls.reload(why)

    async def on_change(self, change: Change) -> None:
        """Invalidate what the change touched, and cut the live connections it no longer
        allows (within the change follower's interval, on every process)."""
        self.path.on_change(change)
        if change.target_type in ("certificate", "ca", "credential"):
            await self._tls_change(change)
            return
        if change.target_type != "device":
            return
        everyone = [*self._listeners.values(), *self._retired]
        if not any(change.target_id in lst.devices_connected() for lst in everyone):
            return
        device = await self._services.devices.find(change.target_id)
        if device is None:
            await self._cut(change.target_id, "device_deleted")
        elif device.status is not DeviceStatus.ENABLED:
            await self._cut(change.target_id, "device_disabled")
        else:  # still allowed, but perhaps not from every address it was connected from
            await self._cut(change.target_id, "address_removed", keep_sources=device.addresses)

    async def _cut(
        self,
        device_id: str,
        reason: str,
        *,
        keep_sources: tuple[str, ...] | None = None,
        credential: str | None = None,
    ) -> None:
        """Close the device's live connections on every listener (see ``Listener.cut``) and
        write down in the audit log that this process did."""
        cut = sum(
            listener.cut(device_id, reason, keep_sources=keep_sources, credential=credential)
            for listener in [*self._listeners.values(), *self._retired]
        )
        if cut:
            await self._audit_cut(device_id, reason, cut)

    async def _audit_cut(self, device_id: str, reason: str, cut: int) -> None:
        """Write down in the audit log that this process cut ``cut`` connections."""
        entry = NewAuditEntry(
            actor=SYSTEM_CALLER.principal.actor,
            action="connection.cut",
            # Not "device": the change feed must not take the cut for a change to the device.
            target_type="connection",
            target_id=device_id,
            after={"reason": reason, "connections": cut, "pid": os.getpid()},
        )
        try:
            async with self._services.db.transaction() as tx:
                await AuditRepo(tx).append(entry, self._clock.now())
        except FleetgateError as exc:  # the cut stands; only its record is missing
            log.error("audit.write_failed", action=entry.action, device=device_id, detail=str(exc))

    async def _tls_change(self, change: Change) -> None:
        """A revocation closes the connections that certificate opened and, like a new CA or
        a renewed listener certificate, makes the listeners build fresh server contexts."""
        if change.action == "certificate.revoke":
            cut = [
                device_id
                for listener in [*self._listeners.values(), *self._retired]
                for device_id in listener.cut_certificate(change.target_id)
            ]
            for device_id in sorted(set(cut)):
                await self._audit_cut(device_id, "certificate_revoked", cut.count(device_id))
            await self._reload_tls(lambda tls: tls.config.mode == "mtls", "certificate revoked")
            # A listener's own certificate may be the one revoked: its staple says so now.
            await self._refresh_staples(lambda tls: tls.config.mode != "psk")
        elif change.target_type == "ca":  # a CA trusted or removed, or a CRL refreshed
            why = "crl.refresh" if change.action == "crl.refresh" else "CAs changed"
            await self._reload_tls(lambda tls: tls.config.mode == "mtls", why)
        elif change.action == "certificate.renew" or change.target_type == "credential":
            await self._reload_tls(lambda tls: tls.uses_store, change.action)
        if change.target_type == "credential" and self._serves_psk():
            await self._psk_change()

    def _serves_psk(self) -> bool:
        return any(
            lst.config.tls is not None and lst.config.tls.mode == "psk"
            for lst in [*self._listeners.values(), *self._retired]
        )

    async def _psk_change(self) -> None:
        """Read the PSKs again; a removed or replaced key closes what it authenticated."""
        for gone in await self.keys.load():
            await self._cut(gone.device_id, "psk_removed", credential=gone.credential_id)

    async def close(self, drain_timeout_s: float) -> None:
        if self._watching is not None:
            self._watching.cancel()
        everyone = [*self._listeners.values(), *self._retired]
        for listener in everyone:
            await listener.stop_accepting()
        # All at once: the drain time bounds the whole shutdown, not each listener's share.
        await asyncio.gather(*(listener.drain(drain_timeout_s) for listener in everyone))
        self.http.close()
        self._listeners.clear()
        self._retired.clear()
