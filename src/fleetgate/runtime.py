"""The composition root: one event loop, one task group, SIGTERM drains, SIGHUP reloads."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from fleetgate import __version__, logs
from fleetgate.api.app import build_app
from fleetgate.clock import Clock, SystemClock
from fleetgate.config import Config, load_config
from fleetgate.config.schema import split_host_port
from fleetgate.datadir import DataDir, prepare
from fleetgate.dataplane import fastpath
from fleetgate.dataplane.affinity import PortSharing
from fleetgate.dataplane.listeners import ListenerSet
from fleetgate.dataplane.sessions import SessionPlane
from fleetgate.errors import ConfigError, FleetgateError, Unauthenticated
from fleetgate.health import Health
from fleetgate.limits import fds_needed, raise_nofile_limit
from fleetgate.metrics import Metrics
from fleetgate.sealing import Keyring, Secret
from fleetgate.sealing.keyring import ENV_VAR as MASTER_KEY_ENV
from fleetgate.sealing.keyring import load_keyring
from fleetgate.services.bundle import Services
from fleetgate.services.changes import ChangeFollower
from fleetgate.services.context import SYSTEM_CALLER
from fleetgate.services.lifecycle import MaintenanceReport
from fleetgate.store import Database, open_database
from fleetgate.store.changes import Change
from fleetgate.store.migrations import migrate
from fleetgate.store.sealed import SealedSecretRepo
from fleetgate.tuning import tune_malloc
from fleetgate.workers import WorkerPool

log = logs.get_logger("fleetgate.runtime")
ADMIN_TOKEN_ENV = "FLEETGATE_ADMIN_TOKEN"  # noqa: S105 - a variable name
RESTART_KEYS = ("node", "api", "store", "sealing", "pki", "sessions")


class _ApiServer(uvicorn.Server):
    """uvicorn without its own signal handling: the runtime owns SIGTERM and SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[no-untyped-def]
        yield


@dataclass(frozen=True)
class ServeOptions:
    data_dir: Path
    config_path: Path | None
    env: Mapping[str, str]


async def open_keyring(
    data: DataDir, config: Config, db: Database, env: Mapping[str, str]
) -> Keyring:
    """The configured keyring; a key file is created only while nothing is sealed yet."""
    key_path = data.resolve(config.sealing.master_key_file)
    async with db.snapshot() as tx:
        in_use = await SealedSecretRepo(tx).key_ids_in_use()
    from_env = bool(env.get(MASTER_KEY_ENV, "").strip())
    if from_env or key_path.exists():
        keyring = load_keyring(key_path, dict(env))
        missing = sorted(set(in_use) - set(keyring.key_ids))
        if missing:
            # Starting anyway would seal new secrets under a key that cannot open the old ones.
            source = MASTER_KEY_ENV if from_env else str(key_path)
            raise ConfigError(
                f"sealing: {sum(in_use[k] for k in missing)} secrets in the store are sealed "
                f"under {', '.join(missing)}, which {source} does not hold (it holds "
                f"{', '.join(keyring.key_ids)}); give the right master key(s) — with "
                f"{MASTER_KEY_ENV}, list the new key first and the old ones after it"
            )
        return keyring
    if in_use:
        raise ConfigError(
            f"sealing.master_key_file: {key_path} is missing but {sum(in_use.values())} secrets "
            f"are sealed under {', '.join(sorted(in_use))}; restore the key file or set "
            f"{MASTER_KEY_ENV}"
        )
    keyring = Keyring.create_file(key_path)
    log.info("sealing.master_key_created", path=str(key_path), key_id=keyring.active.key_id)
    return keyring


def public_url(config: Config) -> str:
    """Where relying parties reach /pki: configured, or the API's own address."""
    if config.pki.public_url:
        return config.pki.public_url
    host, port = split_host_port(config.api.listen)
    if host in ("0.0.0.0", "::", ""):  # noqa: S104 - recognising a wildcard, not binding one
        log.warning(
            "pki.public_url_guessed",
            detail="api.listen is a wildcard; certificates will point at 127.0.0.1",
            fix="set pki.public_url to the address devices and brokers reach",
        )
        host = "127.0.0.1"
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def _bind_api_socket(address: str) -> socket.socket:
    host, port = split_host_port(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"api.listen: cannot bind {address}: {exc.strerror}") from None
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def _announce_admin_token(secret: Secret) -> None:
    """The one time the first admin token is shown; it goes to stdout, never to the log."""
    sys.stdout.write(
        "\nfleetgate: the first admin API token (shown once; only its hash is stored):\n\n"
        f"    {secret.reveal_text()}\n\n"
        f"    export FLEETGATE_TOKEN={secret.reveal_text()}\n\n"
    )
    sys.stdout.flush()


class Gateway:
    """Everything one serving process owns."""

    def __init__(self, options: ServeOptions, data: DataDir, config: Config, clock: Clock) -> None:
        self.options = options
        self.data = data
        self.config = config
        self.clock = clock
        self.health = Health()
        self.metrics = Metrics()
        self.stop = asyncio.Event()
        self._workers: WorkerPool | None = None

    async def run(self) -> None:
        db = await open_database(self.config.store, self.data.path)
        try:
            await self._run_with(db)
        finally:
            await db.close()

    async def _prepare(self, db: Database) -> Services:
        """Schema, master key, first token, CA: everything before serving."""
        applied = await migrate(db, self.clock)
        if applied:
            log.info("store.migrated", backend=db.dialect, versions=applied)
        keyring = await open_keyring(self.data, self.config, db, self.options.env)
        services = Services.build(
            db,
            keyring,
            self.clock,
            pki=self.config.pki,
            public_url=public_url(self.config),
            sessions=self.config.sessions,
        )
        await services.groups.ensure_default()
        await self._bootstrap_token(services)
        await services.authority.ensure_hierarchy(SYSTEM_CALLER)
        # The first pass makes the OCSP responder and the CRL before anyone asks for them.
        await self._maintain_once(services)
        return services

    async def _run_with(self, db: Database) -> None:
        services = await self._prepare(db)
        listeners = ListenerSet(
            services,
            self.metrics,
            self.clock,
            self.health,
            sharing=PortSharing.for_node(self.config.node),
        )
        await listeners.apply(self.config.listeners, self.config.destinations)
        follower = ChangeFollower(db, self.clock)
        await follower.start_from_now()
        # Session listeners live in this process only: one port, one socket.
        sessions = SessionPlane(services, self.clock, settle=follower.poll_once)
        await sessions.start()

        async def on_change(change: Change) -> None:
            await listeners.on_change(change)
            await sessions.on_change(change)

        follower.subscribe(on_change)
        sock = _bind_api_socket(self.config.api.listen)
        app = build_app(
            services,
            self.health,
            self.metrics,
            self.clock,
            max_body_bytes=self.config.api.max_body_bytes,
            after_write=follower.poll_once,
            reload=lambda: self.reload(listeners),
            session_bind_failure=sessions.bind_failure,
            data_dir=self.data.path,
        )
        server = _ApiServer(
            uvicorn.Config(
                app,
                log_config=None,
                access_log=False,
                lifespan="off",
                server_header=False,
                proxy_headers=False,
                timeout_graceful_shutdown=int(self.config.api.drain_timeout_s) or None,
            )
        )
        loop = asyncio.get_running_loop()
        reloads: asyncio.Queue[None] = asyncio.Queue()
        workers = WorkerPool(
            self.config.node.workers,
            self.data.path,
            self.options.config_path,
            self.options.env,
        )
        loop.add_signal_handler(signal.SIGTERM, self.stop.set)
        loop.add_signal_handler(signal.SIGINT, self.stop.set)
        loop.add_signal_handler(signal.SIGHUP, reloads.put_nowait, None)
        host, port = sock.getsockname()[:2]
        log.info(
            "gateway.started",
            version=__version__,
            node=self.config.node.name,
            api=f"http://{host if ':' not in host else f'[{host}]'}:{port}",
            store=db.dialect,
            data_dir=str(self.data.path),
            pid=os.getpid(),
            relay="compiled" if fastpath.AVAILABLE else f"python: {fastpath.WHY_NOT}",
        )
        try:
            async with asyncio.TaskGroup() as tg:
                api_task = tg.create_task(server.serve(sockets=[sock]))
                reload_task = tg.create_task(self._reload_loop(reloads, listeners))
                maintenance_task = tg.create_task(self._maintenance_loop(services))
                follower_task = tg.create_task(follower.run())
                workers_task = tg.create_task(workers.run())
                self._workers = workers
                await self.stop.wait()
                log.info("gateway.draining", timeout_s=self.config.api.drain_timeout_s)
                self.health.draining = True
                reload_task.cancel()
                maintenance_task.cancel()
                follower_task.cancel()
                server.should_exit = True
                # The workers and this process drain side by side, so drain_timeout_s bounds
                # the whole shutdown.
                await asyncio.gather(
                    workers.stop(self.config.api.drain_timeout_s),
                    listeners.close(self.config.api.drain_timeout_s),
                    sessions.close(),
                )
                workers_task.cancel()
                await api_task
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            sock.close()
        log.info("gateway.stopped")

    async def _bootstrap_token(self, services: Services) -> None:
        wanted = self.options.env.get(ADMIN_TOKEN_ENV)
        secret = await services.tokens.bootstrap_admin(
            SYSTEM_CALLER, Secret(wanted) if wanted else None
        )
        if secret is None:
            if wanted:
                try:
                    await services.tokens.authenticate(wanted)
                except Unauthenticated:
                    log.warning(
                        "bootstrap.admin_token_ignored",
                        reason=f"{ADMIN_TOKEN_ENV} only applies to a store without tokens",
                    )
            return
        if wanted:
            log.info("bootstrap.admin_token_created", source=ADMIN_TOKEN_ENV)
        else:
            log.info("bootstrap.admin_token_created", source="generated")
            _announce_admin_token(secret)

    async def _maintain_once(self, services: Services) -> MaintenanceReport | None:
        """One maintenance pass; a failure is logged and the gateway keeps serving."""
        try:
            return await services.lifecycle.maintain(self.config.pki.alerts)
        except FleetgateError as exc:
            log.error("pki.maintenance_failed", reason=exc.kind.slug, detail=exc.detail)
        except Exception as exc:  # noqa: BLE001 - the API and listeners must outlive a PKI fault
            log.error("pki.maintenance_failed", reason="internal", detail=repr(exc)[:500])
        return None

    async def _maintenance_loop(self, services: Services) -> None:
        """Renewals, CRL refreshes and expiry alerts, every pki.maintenance_interval_s."""
        while True:
            await asyncio.sleep(self.config.pki.maintenance_interval_s)
            report = await self._maintain_once(services)
            if report is None:
                continue
            if (
                report.crls_refreshed
                or report.renewed
                or report.alerts_sent
                or report.alerts_failed
            ):
                log.info(
                    "pki.maintenance",
                    crls_refreshed=report.crls_refreshed,
                    renewed=len(report.renewed),
                    alerts_sent=len(report.alerts_sent),
                    alerts_failed=len(report.alerts_failed),
                )

    async def _reload_loop(self, reloads: asyncio.Queue[None], listeners: ListenerSet) -> None:
        while True:
            await reloads.get()
            with contextlib.suppress(ConfigError):  # logged; the old configuration stays
                await self.reload(listeners)

    async def reload(self, listeners: ListenerSet) -> None:
        """Apply the configuration file again; :class:`ConfigError` (logged, the previous
        configuration kept) when it is invalid."""
        if self._workers is not None:
            self._workers.signal(signal.SIGHUP)  # each worker reads the file itself
        try:
            fresh = await asyncio.to_thread(load_config, self.data.config_path, self.options.env)
        except ConfigError as exc:
            self.metrics.config_reloads.labels("failed").inc()
            log.error("config.reload_failed", detail=exc.detail, kept="previous configuration")
            raise
        needs_restart = [
            key for key in RESTART_KEYS if getattr(fresh, key) != getattr(self.config, key)
        ]
        if needs_restart:
            log.warning(
                "config.restart_required",
                keys=needs_restart,
                detail="these sections apply at the next start; the rest is applied now",
            )
        logs.configure(fresh.log.format, fresh.log.level)
        await listeners.apply(fresh.listeners, fresh.destinations)
        self.config = fresh.model_copy(
            update={key: getattr(self.config, key) for key in needs_restart}
        )
        self.metrics.config_reloads.labels("applied").inc()
        log.info("config.reloaded", listeners=sorted(fresh.listeners))


def serve(options: ServeOptions, clock: Clock | None = None) -> int:
    """Run until SIGTERM/SIGINT; the process exit code."""
    os.umask(0o077)  # the database, keys and config are nobody else's business
    data = prepare(options.data_dir, options.config_path)
    config = load_config(data.config_path, options.env)
    logs.configure(config.log.format, config.log.level)
    raise_nofile_limit(fds_needed(config.listeners.values()))
    gateway = Gateway(options, data, config, clock or SystemClock())
    tune_malloc()
    import uvloop

    uvloop.run(gateway.run())
    return 0
