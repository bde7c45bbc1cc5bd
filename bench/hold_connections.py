"""How many concurrent device connections one fleetgate node holds: ramp up in steps until a step
fails, and say why.

    .venv/bin/python bench/hold_connections.py [--steps 10000,25000,50000,75000,100000]
        [--upstream tls|plain] [--workers 12] [--clients 7] [--sinks 7] [--data DIR]

Each device is registered (through the API of a throwaway fleetgate) with its own loopback
source address and a certificate whose key fleetgate keeps, and routed to one of
``--destinations`` destinations: the same sink on as many addresses (127.0.10.1, ...), because one
destination address:port gives a node at most ~28,000 upstream connections (the ephemeral port
range). The destination is this file's own sink, ``--sinks`` uvloop processes sharing each
address with SO_REUSEPORT: with ``--upstream tls`` (the default) it accepts TLS and requires a
client certificate from fleetgate's CA (the device's own, per connection); with ``plain`` the
destinations are ``unsafe_plaintext``. The sink answers MQTT CONNECT with CONNACK and PINGREQ
with PINGRESP, so a connection counts as held only when a PINGREQ from the device comes back
through fleetgate.

Per step: connect the step's new devices (client processes from ``mqtt_fleet.py``, each bound
to its device's address), PINGREQ every held connection, and report connections held and
answering, failures by reason (client side, and fleetgate's logged refusals), fleetgate's RSS
summed over its process tree and per connection, its CPU per new connection, the most file
descriptors one fleetgate process holds, the sink's and clients' RSS, the kernel's TCP memory
and the machine's available memory. The ramp stops at the first step that fails, or before a
step the available memory would not cover (there is no swap: the OOM killer would decide).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mqtt_fleet import (
    HOST,
    MARKER,
    ClientPool,
    Fleetgate,
    Progress,
    Usage,
    base_env,
    bounded,
    device_address,
    device_id,
    exit_on_signals,
    free_port,
    machine,
    merge_connects,
    next_packet,
    prepare_devices,
    process_tree,
    raise_nofile,
    read_marker,
    rss_kib,
    split,
    stop_process,
)
from support.certs import TestCA  # tests/ is on the path once mqtt_fleet is imported

LISTENER = "hold"
GIB = 1024**3
SINK_READY = "sink.ready"


def destination_address(number: int) -> str:
    return f"127.0.10.{number + 1}"


# -- the sink ---------------------------------------------------------------------------------


class SinkConnection(asyncio.Protocol):
    """Holds a connection; answers CONNECT with CONNACK and PINGREQ with PINGRESP."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        position = 0
        try:
            while (found := next_packet(buffer, position)) is not None:
                first, _, end = found
                if first >> 4 == 1 and self.transport is not None:  # CONNECT
                    self.transport.write(b"\x20\x02\x00\x00")
                elif first >> 4 == 12 and self.transport is not None:  # PINGREQ
                    self.transport.write(b"\xd0\x00")
                position = end
        except ValueError:
            if self.transport is not None:
                self.transport.abort()
            return
        self._buffer = buffer[position:]


async def sink_role(addresses: list[str], port: int, tls: list[str]) -> None:
    context: ssl.SSLContext | None = None
    if tls:
        cert, key, client_ca = tls
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        context.load_verify_locations(cafile=client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    loop = asyncio.get_running_loop()
    servers = [
        await loop.create_server(
            SinkConnection,
            address,
            port,
            ssl=context,
            reuse_port=True,
            backlog=4096,
            ssl_handshake_timeout=60 if context else None,
        )
        for address in addresses
    ]
    sys.stdout.write(SINK_READY + "\n")
    sys.stdout.flush()
    await asyncio.gather(*(server.serve_forever() for server in servers))


@dataclass
class Sinks:
    processes: list[subprocess.Popen[bytes]]

    @classmethod
    def start(
        cls, count: int, addresses: list[str], port: int, tls: list[str], work: Path
    ) -> Sinks:
        sinks = cls([])
        try:
            for number in range(count):
                with (work / f"sink-{number}.err").open("ab") as errors:
                    process = subprocess.Popen(  # noqa: S603 - this very file
                        [
                            sys.executable,
                            str(Path(__file__).resolve()),
                            "--role",
                            "sink",
                            "--sink-addresses",
                            ",".join(addresses),
                            "--sink-port",
                            str(port),
                            *(["--sink-tls", ",".join(tls)] if tls else []),
                        ],
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE,
                        stderr=errors,
                        start_new_session=True,
                    )
                sinks.processes.append(process)
            sinks.wait_ready(work)
        except BaseException:
            sinks.stop()
            raise
        return sinks

    def wait_ready(self, work: Path) -> None:
        for process in self.processes:
            assert process.stdout is not None
            if process.stdout.readline().decode().strip() != SINK_READY:
                raise RuntimeError(f"a sink did not start; see {work}/sink-*.err")

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.processes)

    def stop(self) -> None:
        for process in self.processes:
            stop_process(process, timeout_s=5)


# -- seeding without the API ------------------------------------------------------------------


async def seed_in_process(
    data_dir: Path, indices: range, destinations: int, concurrency: int
) -> float:
    """Register devices and issue their certificates through fleetgate's own services in this
    process: the same code the API runs, without HTTP (about 2.5 times less CPU per device,
    which matters at 100,000 devices on two busy cores). The data directory must have been
    started once (its CA exists) and no fleetgate may run on it meanwhile. Seconds taken."""
    from fleetgate.clock import SystemClock
    from fleetgate.config import load_config
    from fleetgate.datadir import prepare
    from fleetgate.errors import Conflict, NotFound
    from fleetgate.pki.keys import KeyAlgorithm
    from fleetgate.runtime import open_keyring, public_url
    from fleetgate.services.bundle import Services
    from fleetgate.services.context import SYSTEM_CALLER
    from fleetgate.services.devices import NewDevice
    from fleetgate.store import open_database

    env = base_env()
    data = prepare(data_dir, None)
    config = load_config(data.config_path, env)
    db = await open_database(config.store, data.path)
    try:
        keyring = await open_keyring(data, config, db, env)
        services = Services.build(
            db, keyring, SystemClock(), pki=config.pki, public_url=public_url(config)
        )
        tracker = Progress(indices.start, lambda prefix: save_progress(data_dir, prefix))

        async def one(index: int) -> None:
            name = device_id(index)
            spec = NewDevice(
                id=name,
                addresses=(device_address(index),),
                routes={LISTENER: f"d{index % destinations}"},
            )
            try:
                await services.devices.create(SYSTEM_CALLER, spec)
            except Conflict:
                with contextlib.suppress(NotFound):
                    await services.credentials.get(SYSTEM_CALLER, f"device-{name}")
                    tracker.done(index)
                    return
            await services.issuing.issue_for_device(
                SYSTEM_CALLER, name, csr=None, generate=KeyAlgorithm.EC_P256, lifetime=None
            )
            tracker.done(index)

        started = time.perf_counter()
        await bounded(indices, concurrency, one)
        return time.perf_counter() - started
    finally:
        await db.close()


def seed(args: argparse.Namespace, data_dir: Path, work: Path, count: int) -> None:
    kind = f"hold:{args.destinations}"
    marker = read_marker(data_dir)
    if marker.get("kind") != kind:
        raise SystemExit("--seed-in-process continues a registration begun through the API")
    have = int(marker["devices"])
    took = asyncio.run(
        seed_in_process(data_dir, range(have, count), args.destinations, args.register_concurrency)
    )
    save_progress(data_dir, count)
    marker = read_marker(data_dir)
    marker["seeded_in_process_per_s"] = round((count - have) / took, 1)
    (data_dir / MARKER).write_text(json.dumps(marker))
    # The CA file, through the API of a throwaway fleetgate.
    prepare_devices(data_dir, work, count, kind=kind, concurrency=1)
    print(json.dumps(read_marker(data_dir)))


def save_progress(data_dir: Path, prefix: int) -> None:
    marker = read_marker(data_dir)
    marker["devices"] = prefix
    (data_dir / MARKER).write_text(json.dumps(marker))
    print(f"# seeded {prefix}", file=sys.stderr, flush=True)


# -- the machine ------------------------------------------------------------------------------


def meminfo_kib(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == field:
            return int(value.split()[0])
    raise KeyError(field)


def tcp_memory_mib() -> float:
    """Memory the kernel's TCP stack holds (pages, /proc/net/sockstat)."""
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            fields = line.split()
            return int(fields[fields.index("mem") + 1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return math.nan


def most_fds(pids: list[int]) -> int:
    counts = []
    for pid in pids:
        with contextlib.suppress(OSError):
            counts.append(len(os.listdir(f"/proc/{pid}/fd")))
    return max(counts, default=0)


class MemoryGuard:
    """Kills the client processes (releasing every connection) if available memory falls below
    the floor while a step runs; the ramp then stops with reason "memory"."""

    def __init__(self, floor_kib: int, pool: ClientPool) -> None:
        self.floor_kib = floor_kib
        self.pool = pool
        self.tripped = False
        self.lowest_kib = meminfo_kib("MemAvailable")

    async def watch(self) -> None:
        while True:
            available = meminfo_kib("MemAvailable")
            self.lowest_kib = min(self.lowest_kib, available)
            if available < self.floor_kib:
                self.tripped = True
                for process in self.pool.processes:
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
                return
            await asyncio.sleep(0.25)


# -- the ramp ---------------------------------------------------------------------------------


def gateway_env(args: argparse.Namespace, port: int, sink_port: int, ca: Path) -> dict[str, str]:
    listener = f"FLEETGATE_LISTENERS__{LISTENER.upper()}__"
    env = {
        "FLEETGATE_NODE__WORKERS": str(args.workers),
        f"{listener}PROTOCOL": args.protocol,
        f"{listener}BIND": f"{HOST}:{port}",
        f"{listener}DESTINATION": "d0",
        f"{listener}MAX_CONNECTIONS": str(max(args.steps) + 1000),
    }
    for number in range(args.destinations):
        prefix = f"FLEETGATE_DESTINATIONS__D{number}__"
        env[f"{prefix}ADDRESS"] = f"{destination_address(number)}:{sink_port}"
        if args.upstream == "plain":
            env[f"{prefix}UNSAFE_PLAINTEXT"] = "true"
        else:
            env[f"{prefix}SERVER_NAME"] = "localhost"
            env[f"{prefix}CA_FILE"] = str(ca)
            env[f"{prefix}CREDENTIAL"] = "device-#{device_id}"
    return env


def verdict(step: dict[str, Any], target: int) -> str | None:
    """Why a step failed (None: it held)."""
    if step["memory_guard_tripped"]:
        return "memory: available memory fell below the floor; clients killed"
    held = step["answered_ping"]
    if held >= target:
        return None
    reasons = dict(step["client_failures"])
    reasons.update({f"fleetgate {k}": v for k, v in step["fleetgate_refusals"].items()})
    top = ", ".join(f"{k} x{v}" for k, v in Counter(reasons).most_common(4)) or "no reason given"
    return f"{target - held} of {target} not held: {top}"


async def ramp(args: argparse.Namespace, work: Path, data_dir: Path) -> None:
    marker = await asyncio.to_thread(
        prepare_devices,
        data_dir,
        work,
        max(args.steps),
        kind=f"hold:{args.destinations}",
        concurrency=args.register_concurrency,
        routes=lambda index: {LISTENER: f"d{index % args.destinations}"},
    )
    sink_ca = TestCA.create("bench sink CA")
    server = sink_ca.issue_server().write(work, "sink")
    ca_file = sink_ca.write_bundle(work / "sink-ca.pem")
    tls = [str(server.cert), str(server.key), str(data_dir / "bench-fleetgate-ca.pem")]
    sink_port, listen_port = free_port(), free_port()
    addresses = [destination_address(n) for n in range(args.destinations)]
    sinks = await asyncio.to_thread(
        Sinks.start,
        args.sinks,
        addresses,
        sink_port,
        tls if args.upstream == "tls" else [],
        work,
    )
    gateway = Fleetgate(data_dir, work / "fleetgate.log", free_port())
    pool = ClientPool(work, HOST, listen_port, split(range(max(args.steps)), args.clients))
    steps: list[dict[str, Any]] = []
    stopped = "completed every step"
    try:
        gateway.start(gateway_env(args, listen_port, sink_port, ca_file), log_level=args.log_level)
        await asyncio.to_thread(gateway.wait_for, "listener.bound", args.workers, 120)
        await pool.start()
        base = Usage.of(gateway.pid)
        sinks_base = rss_kib(sinks.pids)
        available_base = meminfo_kib("MemAvailable")
        done = 0
        for target in args.steps:
            available = meminfo_kib("MemAvailable")
            if steps and done:
                per_conn_kib = (available_base - steps[-1]["mem_available_kib"]) / done
                need = per_conn_kib * (target - done)
                if available - need < args.memory_floor_gib * GIB / 1024:
                    stopped = (
                        f"memory: step {target} would need ~{need / 2**20:.1f} GiB more "
                        f"({per_conn_kib:.0f} KiB per connection machine-wide), "
                        f"{available / 2**20:.1f} GiB available"
                    )
                    break
            step = await one_step(args, target, done, pool, gateway, sinks, base, sinks_base)
            done = target
            steps.append(step)
            print(json.dumps(step), flush=True)
            why = verdict(step, target)
            if why is not None:
                stopped = f"step {target} failed: {why}"
                break
    finally:
        await pool.stop()
        gateway.stop()
        sinks.stop()
    held = max((s["answered_ping"] for s in steps if verdict(s, s["target"]) is None), default=0)
    result = {
        **machine(),
        "upstream": args.upstream,
        "protocol": args.protocol,
        "workers": args.workers,
        "clients": args.clients,
        "sinks": args.sinks,
        "destinations": args.destinations,
        "registration": marker,
        "largest_step_held": held,
        "stopped": stopped,
    }
    print(json.dumps(result), flush=True)
    print(
        f"hold_connections ({args.upstream} upstream, {args.protocol}, {args.workers} fleetgate "
        f"processes): largest step held {held}; {stopped}"
    )
    for s in steps:
        print(
            f"  {s['target']:>7}: held {s['answered_ping']:>7}, fleetgate "
            f"{s['fleetgate_rss_mib']:.0f} MiB ({s['fleetgate_kib_per_conn']} KiB/conn, "
            f"{s['fleetgate_cpu_ms_per_new_conn']} CPU ms/new conn, max {s['fleetgate_max_fds']} "
            f"fds/process), sink {s['sink_kib_per_conn']} KiB/conn, "
            f"{s['mem_available_kib'] / 2**20:.1f} GiB available, connect {s['connect_wall_s']} s"
        )


async def one_step(
    args: argparse.Namespace,
    target: int,
    done: int,
    pool: ClientPool,
    gateway: Fleetgate,
    sinks: Sinks,
    base: Usage,
    sinks_base: int,
) -> dict[str, Any]:
    before = Usage.of(gateway.pid)
    refused_before = gateway.refusals()
    guard = MemoryGuard(int(args.memory_floor_gib * GIB / 1024), pool)
    watching = asyncio.create_task(guard.watch())
    # Client n owns the devices n, n + clients, ...: its share is its devices below the target.
    shares = [
        len(range(n, target, args.clients)) - len(range(n, done, args.clients))
        for n in range(args.clients)
    ]
    per_client = math.ceil(args.connect_concurrency / args.clients)
    started = time.monotonic()
    try:
        connect = merge_connects(
            await pool.command(
                lambda n: {
                    "cmd": "connect",
                    "count": shares[n],
                    "concurrency": per_client,
                    "timeout_s": args.connect_timeout_s,
                }
            )
        )
        after = Usage.of(gateway.pid)
        pings = await pool.command(lambda _: {"cmd": "ping", "timeout_s": 60, "concurrency": 2000})
    except RuntimeError:
        if not guard.tripped:
            raise
        connect, after, pings = {"connected": 0, "failures": {}, "p50_ms": None}, before, []
    finally:
        watching.cancel()
    refused = Counter(gateway.refusals())
    refused.subtract(refused_before)
    pids = process_tree(gateway.pid)
    held = sum(p["answered"] for p in pings)
    sinks_rss = rss_kib(sinks.pids)
    return {
        "target": target,
        "connected_this_step": connect["connected"],
        "answered_ping": held,
        "client_failures": connect["failures"],
        "fleetgate_refusals": {k: v for k, v in refused.items() if v > 0},
        "fleetgate_refusal_details": {
            k: gateway.details.get(k, "") for k, v in refused.items() if v > 0
        },
        "connect_wall_s": round(time.monotonic() - started, 1),
        "connect_p50_ms": connect.get("p50_ms"),
        "connect_p99_ms": connect.get("p99_ms"),
        "ping_wall_s": round(max((p["wall_s"] for p in pings), default=0), 1),
        "fleetgate_processes": len(pids),
        "fleetgate_rss_mib": round(after.rss_kib / 1024, 1),
        "fleetgate_kib_per_conn": round((after.rss_kib - base.rss_kib) / held, 1) if held else None,
        "fleetgate_cpu_ms_per_new_conn": round(
            (after.cpu_s - before.cpu_s) / connect["connected"] * 1e3, 2
        )
        if connect["connected"]
        else None,
        "fleetgate_max_fds": most_fds(pids),
        "sink_rss_mib": round(sinks_rss / 1024, 1),
        "sink_kib_per_conn": round((sinks_rss - sinks_base) / held, 1) if held else None,
        "clients_rss_mib": round(rss_kib(pool.pids) / 1024, 1),
        "tcp_kernel_mib": round(tcp_memory_mib(), 1),
        "mem_available_kib": meminfo_kib("MemAvailable"),
        "mem_available_lowest_kib": guard.lowest_kib,
        "memory_guard_tripped": guard.tripped,
        "sinks_alive": sinks.alive(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="10000,25000,50000,75000,100000")
    parser.add_argument("--upstream", choices=["tls", "plain"], default="tls")
    parser.add_argument("--protocol", choices=["mqtt", "tcp"], default="mqtt")
    parser.add_argument("--workers", type=int, default=12, help="fleetgate node.workers")
    parser.add_argument("--clients", type=int, default=7, help="client processes")
    parser.add_argument("--sinks", type=int, default=7, help="sink processes")
    parser.add_argument("--destinations", type=int, default=8, help="sink addresses")
    parser.add_argument("--connect-concurrency", type=int, default=256)
    parser.add_argument("--connect-timeout-s", type=float, default=60.0)
    parser.add_argument("--memory-floor-gib", type=float, default=3.0)
    parser.add_argument("--register-concurrency", type=int, default=16)
    parser.add_argument("--log-level", default="info", help="fleetgate's log level")
    parser.add_argument("--data", type=Path, help="keep registered devices here across runs")
    parser.add_argument("--register-only", action="store_true")
    parser.add_argument(
        "--seed-in-process",
        action="store_true",
        help="finish a registration through fleetgate's services in this process, not the API",
    )
    parser.add_argument("--role", choices=["orchestrator", "sink"], default="orchestrator")
    parser.add_argument("--sink-addresses", help=argparse.SUPPRESS)
    parser.add_argument("--sink-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--sink-tls", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import uvloop

    limit = raise_nofile()
    if args.role == "sink":
        tls = args.sink_tls.split(",") if args.sink_tls else []
        uvloop.run(sink_role(args.sink_addresses.split(","), args.sink_port, tls))
        return
    args.steps = [int(s) for s in args.steps.split(",")]
    largest, per_process = max(args.steps), limit - 1000
    for what, count, flag in (
        ("fleetgate process (2 fds a connection)", 2 * largest / args.workers, "--workers"),
        ("client process", largest / args.clients, "--clients"),
        ("sink process", largest / args.sinks, "--sinks"),
    ):
        if count * 1.05 > per_process:  # SO_REUSEPORT spreads by hash, not evenly
            raise SystemExit(f"{flag}: ~{count:.0f} fds per {what}, over {per_process}")
    if largest / args.destinations > 26_000:
        raise SystemExit("--destinations: ~28,000 upstream connections per address at most")
    with socket.socket() as probe:  # the source addresses are usable on this machine
        probe.bind((device_address(largest - 1), 0))
    exit_on_signals()
    work = Path(tempfile.mkdtemp(prefix="fleetgate-hold-"))
    try:
        data_dir = args.data.resolve() if args.data else work / "data"
        if args.seed_in_process:
            seed(args, data_dir, work, largest)
            return
        if args.register_only:
            marker = prepare_devices(
                data_dir,
                work,
                largest,
                kind=f"hold:{args.destinations}",
                concurrency=args.register_concurrency,
                routes=lambda index: {LISTENER: f"d{index % args.destinations}"},
            )
            print(json.dumps(marker))
            return
        uvloop.run(ramp(args, work, data_dir))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
