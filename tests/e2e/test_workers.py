"""``node.workers = 2``: the main process and one ``python -m fleetgate.workers`` share every
listener through SO_REUSEPORT.

Who served a connection is read from the log both processes write to the same stderr: a
worker binds ``worker=<index>`` on everything it logs, the main process binds no such field.
Connections are opened one after another, so their ``listener.connected`` events reach the
pipe in the same order (each is written before the first byte is relayed back).

The tests on the shared pool run in file order and leave it serving, except the last, which
kills its main process; the shutdown tests start their own pool. Every pool is checked for
``fleetgate.workers`` processes left behind (in /proc, by their data directory).
"""

from __future__ import annotations

import os
import select
import signal
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from e2e.conftest import ADMIN
from e2e.gateway import Gateway, base_env, free_port
from fleetgate.dataplane.affinity import source_slot

TIMEOUT_S = 20.0
DRAIN_TIMEOUT_S = 2.0
MAX_ATTEMPTS = 200  # connections tried before concluding one process never gets any
# The device's addresses: connections come from each in turn, since the processes are chosen
# by source address (node.worker_affinity, default source_address).
SOURCES = [f"127.0.0.{i}" for i in range(1, 17)]


@dataclass
class Pool:
    gateway: Gateway
    port: int  # the tcp listener's
    echo_port: int

    def worker_pids(self) -> list[int]:
        return [e["pid"] for e in self.gateway.events if e.get("event") == "worker.started"]


def served_by_worker(event: dict[str, Any]) -> bool:
    return "worker" in event


def _field_is(key: str, value: object) -> Callable[[dict[str, Any]], bool]:
    return lambda event: event.get(key) == value


def in_worker_process(worker: bool) -> Callable[[dict[str, Any]], bool]:
    return lambda event: served_by_worker(event) is worker


def fleetgate_worker_pids(data_dir: Path) -> list[int]:
    """Live ``fleetgate.workers`` processes serving ``data_dir`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue  # gone meanwhile
        if b"fleetgate.workers" in argv and str(data_dir).encode() in argv and state != "Z":
            found.append(int(entry.name))
    return found


def _ts(event: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(event["ts"])


def _wait_until_gone(pid: int, timeout_s: float) -> bool:
    """Whether process ``pid`` ends within ``timeout_s`` (a pidfd turns readable when it does)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([pidfd], [], [], timeout_s)
        return bool(readable)
    finally:
        os.close(pidfd)


def start_pool(data_dir: Path, echo_port: int, workers: int = 2) -> Pool:
    port = free_port()
    gw = Gateway(
        data_dir=data_dir,
        port=free_port(),
        env=base_env(
            FLEETGATE_ADMIN_TOKEN=ADMIN,
            FLEETGATE_NODE__WORKERS=str(workers),
            FLEETGATE_API__DRAIN_TIMEOUT_S=str(DRAIN_TIMEOUT_S),
            FLEETGATE_LISTENERS__PLC__BIND=f"127.0.0.1:{port}",
            FLEETGATE_LISTENERS__PLC__FORWARD_TO=f"127.0.0.1:{echo_port}",
        ),
    )
    pool = Pool(gw, port, echo_port)
    try:
        gw.start()
        gw.wait_for("listener.bound", lambda e: not served_by_worker(e))
        for index in range(1, workers):
            gw.wait_for("listener.bound", _field_is("worker", index))
        with gw.client(ADMIN) as api:
            created = api.post("/v1/devices", json={"id": "plc-1", "addresses": SOURCES})
            assert created.status_code == 201, created.text
    except BaseException:
        stop_pool(pool)
        raise
    return pool


def stop_pool(pool: Pool) -> None:
    """Stop the main process the way an operator does, so it takes its workers with it; a
    worker it failed to stop is ended here, by its pid, and reported."""
    gw = pool.gateway
    if gw.process is not None and gw.process.poll() is None:
        gw.stop()
    leftovers = fleetgate_worker_pids(gw.data_dir)
    for pid in leftovers:
        os.kill(pid, signal.SIGKILL)
    assert not leftovers, f"workers outlived the gateway: {leftovers}"


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        while data := sock.recv(65536):
            sock.sendall(data)


@pytest.fixture(scope="module")
def module_echo() -> Iterator[int]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def shared_pool(tmp_path_factory: pytest.TempPathFactory, module_echo: int) -> Iterator[Pool]:
    """One pool for the tests that leave it serving (they run in file order)."""
    pool = start_pool(tmp_path_factory.mktemp("workers") / "data", module_echo)
    yield pool
    stop_pool(pool)


@pytest.fixture
def pool(shared_pool: Pool) -> Pool:
    assert shared_pool.gateway.process is not None
    assert shared_pool.gateway.process.poll() is None, "the shared gateway died"
    return shared_pool


class Connections:
    """Connections opened one at a time, each paired with the ``listener.connected`` event
    of the process that took it."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._position = pool.gateway.mark()
        self.open: list[tuple[socket.socket, dict[str, Any]]] = []

    def add(self, source: str | None = None) -> tuple[socket.socket, dict[str, Any]]:
        gw = self._pool.gateway
        if source is None:
            source = SOURCES[len(self.open) % len(SOURCES)]
        sock = socket.create_connection(
            ("127.0.0.1", self._pool.port), timeout=TIMEOUT_S, source_address=(source, 0)
        )
        sock.sendall(b"ping")
        assert sock.recv(16) == b"ping"
        event = gw.wait_for("listener.connected", since=self._position)
        self._position = next(i for i, e in enumerate(gw.events) if e is event) + 1
        self.open.append((sock, event))
        return sock, event

    def until_one_lands(
        self, where: Callable[[dict[str, Any]], bool]
    ) -> tuple[socket.socket, dict[str, Any]]:
        for _ in range(MAX_ATTEMPTS):
            sock, event = self.add()
            if where(event):
                return sock, event
        raise AssertionError(f"{MAX_ATTEMPTS} connections and none landed where wanted")

    def until_both_processes_serve(self) -> None:
        for _ in range(MAX_ATTEMPTS):
            self.add()
            by_worker = {served_by_worker(event) for _, event in self.open}
            if by_worker == {True, False}:
                return
        raise AssertionError(f"{MAX_ATTEMPTS} connections all went to one process")

    def close(self) -> None:
        for sock, _ in self.open:
            sock.close()


def test_connections_are_spread_over_both_processes(pool: Pool) -> None:
    conns = Connections(pool)
    try:
        conns.until_both_processes_serve()
        for sock, _ in conns.open:  # every one of them relays, whichever process holds it
            sock.sendall(b"again")
            assert sock.recv(16) == b"again"
    finally:
        conns.close()
    events = [event for _, event in conns.open]
    assert {e.get("worker") for e in events} == {None, 1}
    assert all(e["device"] == "plc-1" and e["listener"] == "plc" for e in events)


def _active_by_process(pool: Pool) -> dict[str, float]:
    with pool.gateway.client(None) as api:
        text = api.get("/metrics").text
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "fleetgate_listener_active_connections":
            for sample in family.samples:
                if sample.labels.get("listener") == "plc":
                    found[sample.labels["process"]] = sample.value
    return found


def test_metrics_show_the_connections_of_every_process(pool: Pool) -> None:
    conns = Connections(pool)
    try:
        conns.until_both_processes_serve()
        held = {"main": 0.0, "worker-1": 0.0}
        for _, event in conns.open:
            held["worker-1" if served_by_worker(event) else "main"] += 1
        # Workers publish their figures every second: wait for the ones counted now.
        deadline = time.monotonic() + TIMEOUT_S
        while (seen := _active_by_process(pool)) != held and time.monotonic() < deadline:
            time.sleep(0.2)
        assert seen == held
    finally:
        conns.close()


def test_a_device_keeps_coming_back_to_the_same_process(pool: Pool) -> None:
    # Two addresses the source-address program sends to different places in the group.
    first = next(a for a in SOURCES if source_slot(a, 2) == 0)
    second = next(a for a in SOURCES if source_slot(a, 2) == 1)
    conns = Connections(pool)
    try:
        served = {
            source: {served_by_worker(conns.add(source)[1]) for _ in range(6)}
            for source in (first, second)
        }
    finally:
        conns.close()
    assert all(len(processes) == 1 for processes in served.values()), served
    assert served[first] != served[second]


def test_every_process_takes_the_hard_open_file_limit(pool: Pool) -> None:
    logged = [e for e in pool.gateway.events if e.get("event") == "limits.nofile"]
    assert {e.get("worker") for e in logged} == {None, 1}
    assert all(e["soft"] == e["hard"] for e in logged), logged
    for pid in pool.worker_pids():
        soft, hard = _open_file_limits(pid)
        assert soft == hard


def _open_file_limits(pid: int) -> tuple[str, str]:
    """Process ``pid``'s RLIMIT_NOFILE (soft, hard) as /proc/PID/limits writes them."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return soft, hard
    raise AssertionError(f"no open-file limit in /proc/{pid}/limits")


def test_disabling_a_device_cuts_its_connections_in_every_process(pool: Pool) -> None:
    gw = pool.gateway
    conns = Connections(pool)
    try:
        conns.until_both_processes_serve()
        mark = gw.mark()
        with gw.client(ADMIN) as api:
            assert api.patch("/v1/devices/plc-1", json={"status": "disabled"}).is_success
        for in_worker in (True, False):
            cut = gw.wait_for(
                "listener.connection_cut",
                in_worker_process(in_worker),
                since=mark,
                timeout_s=10,
            )
            assert (cut["device"], cut["reason"]) == ("plc-1", "device_disabled")
        for sock, event in conns.open:
            try:
                ended = sock.recv(16)
            except ConnectionResetError:
                ended = b""
            assert ended == b"", f"still open after the cut: {event}"
    finally:
        conns.close()
        mark = gw.mark()
        with gw.client(ADMIN) as api:
            assert api.patch("/v1/devices/plc-1", json={"status": "enabled"}).is_success
        # The worker learns it from the change feed: wait, so later tests find it enabled.
        gw.wait_for(
            "registry.invalidated",
            lambda e: e.get("worker") == 1 and e["target_id"] == "plc-1",
            since=mark,
        )


def test_sighup_binds_a_new_listener_in_both_processes(pool: Pool) -> None:
    gw = pool.gateway
    config = gw.data_dir / "fleetgate.toml"
    late_port = free_port()
    config.write_text(
        config.read_text()
        + f'\n[listeners.late]\nbind = "127.0.0.1:{late_port}"\n'
        + f'forward_to = "127.0.0.1:{pool.echo_port}"\n'
    )
    mark = gw.mark()
    gw.signal(signal.SIGHUP)
    gw.wait_for("config.reloaded", since=mark)
    main = gw.wait_for(
        "listener.bound",
        lambda e: e["listener"] == "late" and not served_by_worker(e),
        since=mark,
    )
    worker = gw.wait_for(
        "listener.bound", lambda e: e["listener"] == "late" and e.get("worker") == 1, since=mark
    )
    assert main["addresses"] == worker["addresses"] == [["127.0.0.1", late_port]]
    with socket.create_connection(("127.0.0.1", late_port), timeout=TIMEOUT_S) as sock:
        sock.sendall(b"late")
        assert sock.recv(16) == b"late"


def test_a_killed_worker_is_restarted(pool: Pool) -> None:
    gw = pool.gateway
    first = pool.worker_pids()[-1]
    mark = gw.mark()
    os.kill(first, signal.SIGKILL)  # the worker this module's gateway started
    exited = gw.wait_for("worker.exited", since=mark)
    assert (exited["worker"], exited["exit_code"]) == (1, -signal.SIGKILL)
    started = gw.wait_for("worker.started", since=mark)
    assert started["worker"] == 1
    assert started["pid"] != first
    gw.wait_for("listener.bound", lambda e: e.get("worker") == 1, since=mark)
    conns = Connections(pool)
    try:
        conns.until_both_processes_serve()  # the new worker takes connections again
    finally:
        conns.close()


def test_workers_leave_when_the_main_process_is_killed(pool: Pool) -> None:
    """The last test on the shared pool: it leaves without its main process."""
    gw = pool.gateway
    worker_pid = pool.worker_pids()[-1]
    assert gw.process is not None
    gw.process.kill()  # no chance to stop anyone: the worker must notice on its own
    gw.process.wait(timeout=TIMEOUT_S)
    assert _wait_until_gone(worker_pid, TIMEOUT_S), "the worker outlived its main process"
    gw.wait_for("worker.parent_gone", _field_is("worker", 1))


def test_sigterm_stops_the_workers_too(tmp_path: Path, module_echo: int) -> None:
    pool = start_pool(tmp_path / "data", module_echo)
    gw = pool.gateway
    conns = Connections(pool)
    try:
        [worker_pid] = pool.worker_pids()
        assert fleetgate_worker_pids(gw.data_dir) == [worker_pid]
        conns.until_both_processes_serve()
        assert gw.stop() == 0
    finally:
        conns.close()
        stop_pool(pool)
    assert not Path(f"/proc/{worker_pid}").exists()
    draining = gw.wait_for("gateway.draining")
    gw.wait_for("gateway.stopped")
    # Both processes cut the connections still open when the drain time ran out, and did
    # so at the same time: drain_timeout_s bounds the whole shutdown, not each process's.
    closed = [e for e in gw.events if e.get("event") == "listener.closed"]
    assert {e.get("worker") for e in closed} == {None, 1}
    assert {e["reason"] for e in closed} == {"cancelled"}
    for event in closed:
        waited_s = (_ts(event) - _ts(draining)).total_seconds()
        assert waited_s < DRAIN_TIMEOUT_S + 1.0, (event.get("worker"), waited_s)


def test_a_worker_that_dies_during_shutdown_is_not_replaced(
    tmp_path: Path, module_echo: int
) -> None:
    pool = start_pool(tmp_path / "data", module_echo, workers=3)
    gw = pool.gateway
    conns = Connections(pool)
    try:
        # A live connection on worker 2 makes the shutdown last the drain time, longer than
        # the pause before a dead worker is replaced.
        conns.until_one_lands(_field_is("worker", 2))
        first = gw.wait_for("worker.started", _field_is("worker", 1))["pid"]
        mark = gw.mark()
        os.kill(first, signal.SIGKILL)
        gw.wait_for("worker.exited", _field_is("worker", 1), since=mark)
        gw.signal(signal.SIGTERM)
        assert gw.wait_exit() == 0
    finally:
        conns.close()
        stop_pool(pool)
    restarted = [e for e in gw.events[mark:] if e.get("event") == "worker.started"]
    assert not restarted, "a worker was started while the gateway was stopping"
