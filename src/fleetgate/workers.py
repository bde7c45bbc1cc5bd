"""Several processes serving the listeners: one Python process uses one core.

With ``node.workers = N`` the main process (API, maintenance, its own listeners) starts N-1
data-plane workers: ``python -m fleetgate.workers``. Every process binds each listener with
``SO_REUSEPORT`` and the kernel spreads new connections over them; each follows the change feed
itself, so a revocation cuts connections in every worker. The main process restarts a worker
that dies, forwards SIGHUP, and on SIGTERM tells every worker to drain and waits for them.

Each worker's stdin is a pipe (a socket pair under uvloop) from the main process that nobody
writes to: it reaches end of file only when the main process is gone, however it went (SIGKILL
included), and the worker then drains and leaves instead of serving the listeners on its own.
"""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import sys
from collections.abc import Mapping
from pathlib import Path

from fleetgate import logs
from fleetgate.clock import Clock, SystemClock
from fleetgate.config import Config, load_config
from fleetgate.datadir import DataDir, prepare
from fleetgate.dataplane.affinity import PortSharing
from fleetgate.dataplane.listeners import ListenerSet
from fleetgate.errors import ConfigError, FleetgateError
from fleetgate.health import Health
from fleetgate.limits import fds_needed, raise_nofile_limit
from fleetgate.metrics import Metrics
from fleetgate.metrics_share import Publisher, snapshot_path
from fleetgate.services.bundle import Services
from fleetgate.services.changes import ChangeFollower
from fleetgate.store import open_database
from fleetgate.store.changes import Change

log = logs.get_logger("fleetgate.workers")
WORKER_ENV = "FLEETGATE_WORKER_INDEX"
RESTART_DELAY_S = 1.0


class WorkerPool:
    """The main process's view of its workers."""

    def __init__(
        self, count: int, data_dir: Path, config_path: Path | None, env: Mapping[str, str]
    ) -> None:
        self._count = count
        self._argv = [sys.executable, "-m", "fleetgate.workers", str(data_dir)]
        if config_path is not None:
            self._argv.append(str(config_path))
        self._env = dict(env)
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self._stopping = False

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs.values()]

    async def _spawn(self, index: int) -> None:
        # stdin stays open and silent for the worker's life: its end of file means we are gone.
        proc = await asyncio.create_subprocess_exec(
            *self._argv, env={**self._env, WORKER_ENV: str(index)}, stdin=asyncio.subprocess.PIPE
        )
        self._procs[index] = proc
        log.info("worker.started", worker=index, pid=proc.pid)
        if self._stopping:  # stop() ran while the process was being created
            proc.send_signal(signal.SIGTERM)

    async def run(self) -> None:
        """Start the workers and keep them running until :meth:`stop`."""
        for index in range(1, self._count):
            await self._spawn(index)
        waits = {index: asyncio.create_task(proc.wait()) for index, proc in self._procs.items()}
        try:
            while waits and not self._stopping:
                done, _ = await asyncio.wait(waits.values(), return_when=asyncio.FIRST_COMPLETED)
                for index in [i for i, task in waits.items() if task in done]:
                    code = waits.pop(index).result()
                    if self._stopping:
                        continue
                    log.error("worker.exited", worker=index, exit_code=code, action="restarting")
                    await asyncio.sleep(RESTART_DELAY_S)
                    if self._stopping:  # stop() came during the pause: no replacement
                        break
                    await self._spawn(index)
                    waits[index] = asyncio.create_task(self._procs[index].wait())
        finally:
            for task in waits.values():
                task.cancel()

    def signal(self, sig: int) -> None:
        for proc in self._procs.values():
            if proc.returncode is None:
                proc.send_signal(sig)

    async def stop(self, timeout_s: float) -> None:
        self._stopping = True
        self.signal(signal.SIGTERM)
        await asyncio.gather(
            *(self._reap(index, proc, timeout_s + 5) for index, proc in list(self._procs.items()))
        )

    @staticmethod
    async def _reap(index: int, proc: asyncio.subprocess.Process, timeout_s: float) -> None:
        try:
            async with asyncio.timeout(timeout_s):
                await proc.wait()
        except TimeoutError:
            log.error("worker.killed", worker=index, pid=proc.pid)
            proc.kill()
            await proc.wait()


class Worker:
    """One data-plane process: listeners, the change feed, reload and drain; no API."""

    def __init__(self, data: DataDir, config: Config, clock: Clock, env: Mapping[str, str]) -> None:
        self.data = data
        self.config = config
        self.clock = clock
        self.env = env

    async def run(self) -> None:
        from fleetgate.runtime import open_keyring, public_url

        db = await open_database(self.config.store, self.data.path)
        try:
            keyring = await open_keyring(self.data, self.config, db, self.env)
            services = Services.build(
                db,
                keyring,
                self.clock,
                pki=self.config.pki,
                public_url=public_url(self.config),
                sessions=self.config.sessions,
            )
            metrics = Metrics()
            sharing = PortSharing.for_node(self.config.node)
            listeners = ListenerSet(services, metrics, self.clock, Health(), sharing=sharing)
            index = int(self.env.get(WORKER_ENV, "0"))
            publisher = Publisher(
                metrics.registry, snapshot_path(self.data.path, index), self.clock
            )
            follower = ChangeFollower(db, self.clock)
            await follower.start_from_now()
            await listeners.apply(self.config.listeners, self.config.destinations)

            async def on_change(change: Change) -> None:
                await listeners.on_change(change)

            follower.subscribe(on_change)
            stop = asyncio.Event()
            reloads: asyncio.Queue[None] = asyncio.Queue()
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGTERM, stop.set)
            loop.add_signal_handler(signal.SIGINT, lambda: None)  # the main process decides
            loop.add_signal_handler(signal.SIGHUP, reloads.put_nowait, None)
            watching_parent = _watch_parent(loop, stop)
            async with asyncio.TaskGroup() as tg:
                follow = tg.create_task(follower.run())
                reload = tg.create_task(self._reload_loop(reloads, listeners))
                publish = tg.create_task(publisher.run())
                await stop.wait()
                follow.cancel()
                reload.cancel()
                publish.cancel()  # and its snapshot goes with it
                await listeners.close(self.config.api.drain_timeout_s)
            if watching_parent:
                loop.remove_reader(0)
        finally:
            await db.close()

    async def _reload_loop(self, reloads: asyncio.Queue[None], listeners: ListenerSet) -> None:
        while True:
            await reloads.get()
            try:
                fresh = await asyncio.to_thread(load_config, self.data.config_path, self.env)
            except ConfigError as exc:
                log.error("config.reload_failed", detail=exc.detail, kept="previous configuration")
                continue
            logs.configure(fresh.log.format, fresh.log.level)
            await listeners.apply(fresh.listeners, fresh.destinations)
            self.config = fresh


def _watch_parent(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> bool:
    """Set ``stop`` when stdin, the main process's pipe, reaches end of file."""
    try:
        mode = os.fstat(0).st_mode
        if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):  # uvloop hands over a socket
            return False  # not started by a WorkerPool: nothing to watch
    except OSError:
        return False

    def readable() -> None:
        try:
            data = os.read(0, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(0)
            if not stop.is_set():
                log.warning("worker.parent_gone", action="draining")
                stop.set()

    loop.add_reader(0, readable)
    return True


def main(argv: list[str]) -> int:
    data_dir = Path(argv[0])
    config_path = Path(argv[1]) if len(argv) > 1 else None
    env = dict(os.environ)
    try:
        data = prepare(data_dir, config_path)
        config = load_config(data.config_path, env)
    except FleetgateError as exc:
        sys.stderr.write(f"fleetgate worker: {exc.detail}\n")
        return 78
    logs.configure(config.log.format, config.log.level)
    from fleetgate.tuning import tune_malloc

    tune_malloc()
    import uvloop

    with logs.bind(worker=int(env.get(WORKER_ENV, "0"))):
        # Inherited from the main process already, but a worker started by hand is not.
        raise_nofile_limit(fds_needed(config.listeners.values()))
        uvloop.run(Worker(data, config, SystemClock(), env).run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
