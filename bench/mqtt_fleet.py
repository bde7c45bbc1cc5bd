"""The real thing: N devices, each with its own client certificate, publishing plain MQTT through
fleetgate to a real mosquitto that requires a client certificate and takes its CN as username.

    .venv/bin/python bench/mqtt_fleet.py [--devices 10000] [--workers 2] [--rate 5000]
        [--duration-s 20] [--payload-bytes 100] [--repeat 3] [--clients 2] [--data DIR]
        [--relay compiled|python] [--device-tls]

Once: a throwaway fleetgate registers N devices, each with its own loopback source address
(127.1.1.1, 127.1.1.2, ...), and issues each a certificate whose key fleetgate keeps
(``device-<id>``). Then, per run: a fresh mosquitto (TLS listener with ``require_certificate``
and ``use_identity_as_username``, an ACL ``pattern write fleet/%u/#``, and a plain listener for
an observer) and a fresh ``fleetgate serve`` (an mqtt listener whose destination presents
``device-#{device_id}``, ``node.workers`` from the flag). Client processes (uvloop) open one
plain MQTT connection per device, each bound to its device's address, and wait for every
CONNACK; then they publish at ``--rate`` messages/s in total for ``--duration-s``, QoS 0 and
then QoS 1, while an observer subscribed to ``fleet/#`` on mosquitto's plain listener counts
what arrives.

Measured from /proc: fleetgate's RSS summed over its process tree before the devices connect and
with all connected (KiB per connected device), its CPU (utime + stime over the tree) while the
devices connect (ms per connection) and while they publish (µs per message, raw and less the
idle rate measured just before), and the same for mosquitto. One JSON line per run, one with
the medians, then a human summary. Every process and temp directory is removed at the end,
also on failure. ``--data DIR`` keeps the registered devices for the next invocation.

The other modes of this file are its own pieces: ``--role client`` is one client process
(commands as JSON lines on stdin, answers on stdout), also used by ``hold_connections.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import math
import os
import platform
import pwd
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

THIS_FILE = Path(__file__).resolve()
REPO = THIS_FILE.parent.parent
VENV_BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO / "tests"))

from support.certs import TestCA  # noqa: E402 - tests/ joins the path just above

HOST = "127.0.0.1"
TOKEN = "bench-admin-token"  # noqa: S105 - a throwaway gateway's bootstrap token
LISTENER = "fleet"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
POLL_S = 0.05  # how often a wait re-reads what it waits for (a log file, /proc)
SETTLE_S = 12.0  # after the fleet left: past the tunnel core's 10 s between trims
MARKER = "bench-devices.json"  # in a kept --data directory: what is registered there


# -- devices ----------------------------------------------------------------------------------


def device_id(index: int) -> str:
    return f"dev-{index:06d}"


def device_address(index: int) -> str:
    """A distinct loopback address per device: 127.1.1.1, ..., 127.1.1.254, 127.1.2.1, ...
    (254 x 254 per second octet; no .0 or .255 anywhere)."""
    per_octet = 254 * 254
    second, rest = divmod(index, per_octet)
    third, fourth = divmod(rest, 254)
    if second > 253:
        raise ValueError(f"device {index}: out of loopback addresses")
    return f"127.{1 + second}.{1 + third}.{1 + fourth}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def raise_nofile() -> int:
    """Raise this process's (and its children's) open-file limit to the hard limit."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def percentile(values: Sequence[float], fraction: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


# -- /proc accounting -------------------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants, as /proc shows them now."""
    children = _children()
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def rss_kib(pids: Iterable[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KIB
    return total


def cpu_times_s(pids: Iterable[int]) -> tuple[float, float]:
    """User and system CPU seconds, summed."""
    user = system = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            user, system = user + int(fields[11]), system + int(fields[12])
    return user / CLK_TCK, system / CLK_TCK


def cpu_s(pids: Iterable[int]) -> float:
    return sum(cpu_times_s(pids))


def open_fds(pids: Iterable[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += len(os.listdir(f"/proc/{pid}/fd"))
    return total


@dataclass
class Usage:
    """RSS, CPU and open files of a process tree at one instant."""

    rss_kib: int
    cpu_s: float
    system_s: float
    fds: int
    processes: int

    @classmethod
    def of(cls, root: int) -> Usage:
        pids = process_tree(root)
        user, system = cpu_times_s(pids)
        return cls(rss_kib(pids), user + system, system, open_fds(pids), len(pids))


# -- child processes --------------------------------------------------------------------------


def stop_process(process: subprocess.Popen[bytes] | None, timeout_s: float = 15.0) -> None:
    """SIGTERM the process's group (it was started in a session of its own), then SIGKILL."""
    if process is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=timeout_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # stragglers: workers of a killed main
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=timeout_s)


def exit_on_signals() -> None:
    """SIGTERM and SIGINT (which a background job ignores by default) end the run through its
    cleanup: every child process stopped, every temp directory removed."""

    def stop(signum: int, _: object) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETGATE_")}
    env.update(extra)
    return env


@dataclass
class Fleetgate:
    """A ``fleetgate serve`` child whose JSON log goes to a file, read incrementally: events
    are counted by name, and refusals and closes by reason (with one detail for each)."""

    data_dir: Path
    log_path: Path
    api_port: int
    process: subprocess.Popen[bytes] | None = None
    counts: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    details: dict[str, str] = field(default_factory=dict)
    _offset: int = 0

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.api_port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, config_env: Mapping[str, str], *, log_level: str = "info") -> Fleetgate:
        env = base_env(
            FLEETGATE_ADMIN_TOKEN=TOKEN,
            FLEETGATE_API__LISTEN=f"{HOST}:{self.api_port}",
            FLEETGATE_LOG__FORMAT="json",
            FLEETGATE_LOG__LEVEL=log_level,
            **config_env,
        )
        with self.log_path.open("ab") as log:
            self._offset = self.log_path.stat().st_size
            self.process = subprocess.Popen(  # noqa: S603 - our own venv's fleetgate
                [str(VENV_BIN / "fleetgate"), "serve", "--data", str(self.data_dir)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        return self

    def read_log(self) -> None:
        """Account for the log lines written since the last read."""
        with self.log_path.open("rb") as log:
            log.seek(self._offset)
            chunk = log.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._offset += len(complete)
        for line in complete.splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            name = str(event.get("event"))
            self.counts[name] += 1
            reason = event.get("reason")
            if name in ("listener.refused", "upstream.refused") or (
                name == "listener.closed" and reason != "cancelled"
            ):
                key = f"{name}:{reason}"
                self.outcomes[key] += 1
                self.details.setdefault(key, str(event.get("detail", ""))[:200])
            elif name == "worker.exited" or event.get("level") == "error":
                self.outcomes[name] += 1
                self.details.setdefault(name, json.dumps(event)[:300])

    def count(self, name: str) -> int:
        self.read_log()
        return self.counts[name]

    def wait_for(self, name: str, count: int = 1, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.count(name) < count:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"fleetgate exited ({self.process.returncode}); see {self}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"fewer than {count} {name} events in {timeout_s}s; see {self}")
            time.sleep(POLL_S)

    def refusals(self) -> dict[str, int]:
        """Refusals, lost connections, errors and worker restarts logged so far."""
        self.read_log()
        return dict(self.outcomes)

    def stop(self) -> None:
        stop_process(self.process)

    def __str__(self) -> str:
        return f"fleetgate log {self.log_path}"


# -- registration -----------------------------------------------------------------------------


async def bounded[T](
    items: Iterable[T], concurrency: int, run: Callable[[T], Awaitable[None]]
) -> None:
    """``run`` every item, at most ``concurrency`` at once: that many workers share one
    iterator (no task, and no semaphore waiter, per item: with 100,000 items both cost
    quadratic time in asyncio's Semaphore)."""
    shared = iter(items)

    async def worker() -> None:
        for item in shared:
            await run(item)

    async with asyncio.TaskGroup() as tasks:
        for _ in range(concurrency):
            tasks.create_task(worker())


class Progress:
    """The contiguous prefix of indices done, for a resumable marker."""

    def __init__(self, start: int, on_prefix: Callable[[int], None]) -> None:
        self.prefix = start
        self._done: set[int] = set()
        self._on_prefix = on_prefix

    def done(self, index: int) -> None:
        self._done.add(index)
        before = self.prefix
        while self.prefix in self._done:
            self._done.discard(self.prefix)
            self.prefix += 1
        if self.prefix // 1000 != before // 1000:
            self._on_prefix(self.prefix)


async def register_devices(
    url: str,
    indices: range,
    *,
    concurrency: int,
    routes: Callable[[int], dict[str, str]] | None = None,
    certificates: bool = True,
    progress: Callable[[int], None] = lambda prefix: None,
) -> float:
    """Register devices ``indices`` with their addresses (and certificates); seconds taken.
    A device that exists already (an interrupted registration) gets its certificate only if
    its credential is missing."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    tracker = Progress(indices.start, progress)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as api:

        async def one(index: int) -> None:
            for attempt in range(3):  # a transient failure of the local API is retried
                try:
                    await register_one(index)
                    return
                except httpx.TransportError as exc:
                    print(f"# {device_id(index)}: {exc!r}, retrying", file=sys.stderr, flush=True)
                    if attempt == 2:
                        raise

        async def register_one(index: int) -> None:
            name = device_id(index)
            body: dict[str, Any] = {"id": name, "addresses": [device_address(index)]}
            if routes is not None:
                body["routes"] = routes(index)
            created = await api.post("/v1/devices", json=body)
            if created.status_code not in (201, 409):
                raise RuntimeError(f"register {name}: {created.text}")
            if certificates and (
                created.status_code == 201
                or (await api.get(f"/v1/credentials/device-{name}")).status_code == 404
            ):
                issued = await api.post(
                    f"/v1/devices/{name}/certificates",
                    json={"generate_key": {"algorithm": "ec-p256"}},
                )
                if issued.status_code != 201:
                    raise RuntimeError(f"issue for {name}: {issued.text}")
            tracker.done(index)

        started = time.perf_counter()
        await bounded(indices, concurrency, one)
        return time.perf_counter() - started


def read_marker(data_dir: Path) -> dict[str, Any]:
    try:
        marker: dict[str, Any] = json.loads((data_dir / MARKER).read_text())
        return marker
    except (OSError, ValueError):
        return {}


def prepare_devices(
    data_dir: Path,
    work: Path,
    count: int,
    *,
    kind: str,
    concurrency: int,
    routes: Callable[[int], dict[str, str]] | None = None,
    certificates: bool = True,
) -> dict[str, Any]:
    """Make sure ``data_dir`` holds devices 0..count-1 (registering what is missing through the
    API of a throwaway fleetgate); returns the marker with the registration rate. Progress is
    kept in the marker, so an interrupted registration resumes."""
    marker = read_marker(data_dir)
    if marker and marker.get("kind") != kind:
        raise SystemExit(f"{data_dir} holds {marker.get('kind')} devices, not {kind}: use another")
    have = int(marker.get("devices", 0))
    ca_file = data_dir / "bench-fleetgate-ca.pem"
    if have >= count and ca_file.exists():
        return marker
    data_dir.mkdir(parents=True, exist_ok=True)
    gateway = Fleetgate(data_dir, work / "register.log", free_port())

    def save(prefix: int, **extra: Any) -> None:
        marker.update(kind=kind, devices=prefix, certificates=certificates, **extra)
        (data_dir / MARKER).write_text(json.dumps(marker))

    def progress(prefix: int) -> None:
        save(prefix)
        print(f"# registered {prefix}/{count}", file=sys.stderr, flush=True)

    try:
        gateway.start({})
        gateway.wait_for("gateway.started")
        if have < count:
            took = asyncio.run(
                register_devices(
                    gateway.url,
                    range(have, count),
                    concurrency=concurrency,
                    routes=routes,
                    certificates=certificates,
                    progress=progress,
                )
            )
            save(count, registered_per_s=round((count - have) / took, 1))
        ca = httpx.get(f"{gateway.url}/pki/ca.pem", timeout=30)
        ca.raise_for_status()
        ca_file.write_bytes(ca.content)
    finally:
        gateway.stop()
    return marker


# -- MQTT on the wire (just what the benchmark sends and reads) -------------------------------


def _remaining_length(length: int) -> bytes:
    out = bytearray()
    while True:
        length, digit = length // 128, length % 128
        out.append(digit | (0x80 if length else 0))
        if not length:
            return bytes(out)


def _string(text: str) -> bytes:
    raw = text.encode()
    return len(raw).to_bytes(2, "big") + raw


def encode_connect(client_id: str, keepalive_s: int = 0) -> bytes:
    """MQTT 3.1.1 CONNECT, clean session, no login (the certificate is the identity)."""
    body = _string("MQTT") + bytes([4, 0x02]) + keepalive_s.to_bytes(2, "big") + _string(client_id)
    return b"\x10" + _remaining_length(len(body)) + body


def encode_publish(topic: bytes, payload: bytes, qos: int, packet_id: int = 0) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic
    if qos:
        body += packet_id.to_bytes(2, "big")
    body += payload
    return bytes([0x30 | (qos << 1)]) + _remaining_length(len(body)) + body


def encode_subscribe(topic: str, packet_id: int = 1) -> bytes:
    body = packet_id.to_bytes(2, "big") + _string(topic) + b"\x00"
    return b"\x82" + _remaining_length(len(body)) + body


PINGREQ = b"\xc0\x00"


def next_packet(buffer: bytes | bytearray, start: int) -> tuple[int, int, int] | None:
    """(first byte, body start, end) of the packet at ``start``, or None if incomplete."""
    multiplier, length, position = 1, 0, start + 1
    while True:
        if position >= len(buffer):
            return None
        digit = buffer[position]
        length += (digit & 0x7F) * multiplier
        position += 1
        if not digit & 0x80:
            break
        multiplier *= 128
        if multiplier > 128**3:
            raise ValueError("malformed remaining length")
    end = position + length
    return (buffer[start], position, end) if end <= len(buffer) else None


# -- the client role: many device connections in one uvloop process ---------------------------


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, OSError) and exc.errno:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return type(exc).__name__


@dataclass
class Acks:
    """QoS 1 bookkeeping shared by a client's connections while they publish."""

    latencies: list[float] = field(default_factory=list)
    outstanding: int = 0
    drained: asyncio.Event = field(default_factory=asyncio.Event)

    def sent(self) -> None:
        self.outstanding += 1
        self.drained.clear()

    def acked(self, latency: float) -> None:
        self.latencies.append(latency)
        self.outstanding -= 1
        if not self.outstanding:
            self.drained.set()


class DeviceConnection(asyncio.Protocol):
    """One device's plain MQTT connection, from the device's side."""

    def __init__(self, index: int, loop: asyncio.AbstractEventLoop) -> None:
        self.index = index
        self.topic = f"fleet/{device_id(index)}/telemetry".encode()
        self.transport: asyncio.Transport | None = None
        self.connack: asyncio.Future[int] = loop.create_future()
        self.alive = False
        self.pong: asyncio.Future[None] | None = None
        self.next_id = 0
        self.unacked: dict[int, float] = {}
        self.acks: Acks | None = None
        self._buffer = b""
        self._loop = loop

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's TCPTransport

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        position = 0
        while (found := next_packet(buffer, position)) is not None:
            first, body, end = found
            kind = first >> 4
            if kind == 4:  # PUBACK
                sent = self.unacked.pop(int.from_bytes(buffer[body : body + 2], "big"), None)
                if sent is not None and self.acks is not None:
                    self.acks.acked(self._loop.time() - sent)
            elif kind == 13:  # PINGRESP
                if self.pong is not None and not self.pong.done():
                    self.pong.set_result(None)
            elif kind == 2 and not self.connack.done():  # CONNACK
                self.connack.set_result(buffer[body + 1])
            position = end
        self._buffer = buffer[position:]

    def connection_lost(self, exc: Exception | None) -> None:
        self.alive = False
        if not self.connack.done():
            self.connack.set_exception(exc or ConnectionResetError("closed before CONNACK"))
        if self.pong is not None and not self.pong.done():
            self.pong.set_exception(exc or ConnectionResetError("closed"))

    def publish(self, payload: bytes, qos: int) -> None:
        assert self.transport is not None
        if qos and self.acks is not None:
            self.next_id = self.next_id % 65535 + 1
            self.unacked[self.next_id] = self._loop.time()
            self.acks.sent()
        self.transport.write(encode_publish(self.topic, payload, qos, self.next_id))


class Client:
    """The devices of one client process; runs the orchestrator's commands."""

    def __init__(
        self, host: str, port: int, indices: list[int], cafile: Path | None = None
    ) -> None:
        self.host, self.port = host, port
        # A device that speaks TLS trusts fleetgate's root (the listener's certificate).
        self.tls = ssl.create_default_context(cafile=str(cafile)) if cafile else None
        self.pending = list(reversed(indices))  # popped from the end: lowest index first
        self.connections: list[DeviceConnection] = []
        self.loop = asyncio.get_running_loop()

    async def _connect_one(
        self, index: int, timeout_s: float, failures: Counter[str], latencies: list[float]
    ) -> None:
        started = self.loop.time()
        transport: asyncio.BaseTransport | None = None
        try:
            async with asyncio.timeout(timeout_s):
                transport, conn = await self.loop.create_connection(
                    lambda: DeviceConnection(index, self.loop),
                    self.host,
                    self.port,
                    local_addr=(device_address(index), 0),
                    ssl=self.tls,
                    server_hostname="localhost" if self.tls else None,
                )
                assert conn.transport is not None
                conn.transport.write(encode_connect(device_id(index)))
                code = await conn.connack
        except (OSError, TimeoutError, ConnectionError) as exc:
            failures[_reason(exc)] += 1
            if transport is not None:
                transport.close()
            return
        if code != 0:
            failures[f"connack_{code}"] += 1
            transport.close()
            return
        conn.alive = True
        self.connections.append(conn)
        latencies.append(self.loop.time() - started)

    async def connect(self, count: int, concurrency: int, timeout_s: float) -> dict[str, Any]:
        """Connect ``count`` more devices, at most ``concurrency`` handshakes at once."""
        failures: Counter[str] = Counter()
        latencies: list[float] = []
        batch = [self.pending.pop() for _ in range(min(count, len(self.pending)))]

        async def one(index: int) -> None:
            await self._connect_one(index, timeout_s, failures, latencies)

        started = self.loop.time()
        await bounded(batch, concurrency, one)
        return {
            "attempted": len(batch),
            "connected": len(latencies),
            "failures": dict(failures),
            "wall_s": self.loop.time() - started,
            "latencies_s": latencies,
            "alive": self.alive(),
        }

    def alive(self) -> int:
        return sum(1 for c in self.connections if c.alive)

    async def publish(
        self, qos: int, rate: float, duration_s: float, payload: bytes, drain_s: float
    ) -> dict[str, Any]:
        """Publish at ``rate``/s round-robin over the live devices; QoS 1 waits for PUBACKs."""
        live = [c for c in self.connections if c.alive]
        acks = Acks()
        for conn in live:
            conn.unacked.clear()
            conn.acks = acks if qos else None
        sent = turn = 0
        started = self.loop.time()
        while live and (now := self.loop.time()) < started + duration_s:
            due = int((now - started) * rate)
            while sent < due:
                live[turn % len(live)].publish(payload, qos)
                turn += 1
                sent += 1
            await asyncio.sleep(0.005)
        wall = self.loop.time() - started
        if acks.outstanding:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(drain_s):
                    await acks.drained.wait()
        return {
            "sent": sent,
            "wall_s": wall,
            "acked": len(acks.latencies),
            "ack_latencies_s": acks.latencies,
            "alive": self.alive(),
        }

    async def ping(self, timeout_s: float, concurrency: int) -> dict[str, Any]:
        """PINGREQ on every live connection: how many answered end to end within the time."""
        live = [c for c in self.connections if c.alive]
        answered = 0

        async def one(conn: DeviceConnection) -> None:
            nonlocal answered
            conn.pong = self.loop.create_future()
            assert conn.transport is not None
            conn.transport.write(PINGREQ)
            with contextlib.suppress(TimeoutError, ConnectionError, OSError):
                async with asyncio.timeout(timeout_s):
                    await conn.pong
                    answered += 1

        started = self.loop.time()
        await bounded(live, concurrency, one)
        return {"live": len(live), "answered": answered, "wall_s": self.loop.time() - started}

    def close(self) -> dict[str, Any]:
        """Drop every connection; its device can connect again."""
        alive = self.alive()
        for conn in self.connections:
            if conn.transport is not None:
                conn.transport.abort()
        self.pending.extend(sorted((c.index for c in self.connections), reverse=True))
        self.connections.clear()
        return {"closed": alive}


async def client_role(host: str, port: int, indices: list[int], cafile: Path | None) -> None:
    client = Client(host, port, indices, cafile)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def answer(reply: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()

    answer({"ready": True, "devices": len(indices)})
    while line := await reader.readline():
        command = json.loads(line)
        match command["cmd"]:
            case "connect":
                answer(
                    await client.connect(
                        command["count"], command["concurrency"], command["timeout_s"]
                    )
                )
            case "publish":
                answer(
                    await client.publish(
                        command["qos"],
                        command["rate"],
                        command["duration_s"],
                        command["payload"].encode(),
                        command["drain_s"],
                    )
                )
            case "ping":
                answer(await client.ping(command["timeout_s"], command["concurrency"]))
            case "alive":
                answer({"alive": client.alive()})
            case "close":
                answer(client.close())


class ClientPool:
    """The orchestrator's side of the client processes (this file with ``--role client``)."""

    def __init__(self, work: Path, host: str, port: int, shares: list[list[int]]) -> None:
        self._work, self._host, self._port, self._shares = work, host, port, shares
        self.processes: list[asyncio.subprocess.Process] = []
        self.cafile: Path | None = None  # devices speak TLS, trusting this root

    async def start(self) -> None:
        for number, share in enumerate(self._shares):
            devices_file = self._work / f"client-{number}.json"
            devices_file.write_text(json.dumps(share))
            with (self._work / f"client-{number}.err").open("ab") as errors:
                process = await asyncio.create_subprocess_exec(
                    sys.executable,
                    str(THIS_FILE),
                    "--role",
                    "client",
                    "--target",
                    f"{self._host}:{self._port}",
                    "--devices-file",
                    str(devices_file),
                    *(["--device-cafile", str(self.cafile)] if self.cafile else []),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=errors,
                    limit=64 * 1024 * 1024,
                )
            self.processes.append(process)
        await asyncio.gather(*(self._read(p) for p in self.processes))

    async def _read(self, process: asyncio.subprocess.Process) -> dict[str, Any]:
        assert process.stdout is not None
        line = await process.stdout.readline()
        if not line:
            raise RuntimeError(
                f"client process {process.pid} exited; see {self._work}/client-*.err"
            )
        reply: dict[str, Any] = json.loads(line)
        return reply

    async def command(self, per_client: Callable[[int], dict[str, Any]]) -> list[dict[str, Any]]:
        for number, process in enumerate(self.processes):
            assert process.stdin is not None
            process.stdin.write((json.dumps(per_client(number)) + "\n").encode())
        return list(await asyncio.gather(*(self._read(p) for p in self.processes)))

    async def stop(self) -> None:
        for process in self.processes:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        self.processes.clear()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]


def split(indices: Sequence[int], parts: int) -> list[list[int]]:
    return [list(indices[i::parts]) for i in range(parts)]


def merge_connects(replies: list[dict[str, Any]]) -> dict[str, Any]:
    failures: Counter[str] = Counter()
    latencies: list[float] = []
    for reply in replies:
        failures.update(reply["failures"])
        latencies.extend(reply["latencies_s"])
    return {
        "attempted": sum(r["attempted"] for r in replies),
        "connected": sum(r["connected"] for r in replies),
        "alive": sum(r["alive"] for r in replies),
        "failures": dict(failures),
        "wall_s": max(r["wall_s"] for r in replies),
        "p50_ms": round(percentile(latencies, 0.5) * 1e3, 1),
        "p99_ms": round(percentile(latencies, 0.99) * 1e3, 1),
    }


# -- mosquitto --------------------------------------------------------------------------------


@dataclass
class Mosquitto:
    """Debian's mosquitto: TLS listener for fleetgate (client certificates from fleetgate's CA,
    CN as username, each device may publish under fleet/<its id>/) and a plain one for the
    observer. Logs only warnings and errors: 10,000 connection messages are not the point."""

    root: Path
    tls_port: int
    plain_port: int
    process: subprocess.Popen[bytes] | None = None

    def start(self, client_ca: Path, server_cert: Path, server_key: Path) -> Mosquitto:
        binary = next(
            (
                p
                for p in (shutil.which("mosquitto"), "/usr/sbin/mosquitto")
                if p and Path(p).exists()
            ),
            None,
        )
        if binary is None:
            raise SystemExit("mosquitto is not installed (apt-get install mosquitto)")
        (self.root / "acl").write_text("pattern write fleet/%u/#\n")
        user = pwd.getpwuid(os.geteuid()).pw_name
        (self.root / "mosquitto.conf").write_text(
            "\n".join(
                [
                    "per_listener_settings true",
                    f"user {user}",
                    "persistence false",
                    f"log_dest file {self.root / 'mosquitto.log'}",
                    "log_type error",
                    "log_type warning",
                    "connection_messages false",
                    "max_queued_messages 100000",
                    f"listener {self.tls_port} {HOST}",
                    "allow_anonymous false",
                    f"cafile {client_ca}",
                    f"certfile {server_cert}",
                    f"keyfile {server_key}",
                    "require_certificate true",
                    "use_identity_as_username true",
                    f"acl_file {self.root / 'acl'}",
                    f"listener {self.plain_port} {HOST}",
                    "allow_anonymous true",
                    "",
                ]
            )
        )
        with (self.root / "mosquitto.out").open("ab") as out:
            self.process = subprocess.Popen(  # noqa: S603 - the installed broker
                [binary, "-c", str(self.root / "mosquitto.conf")],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        deadline = time.monotonic() + 15
        while not all(_connectable(p) for p in (self.tls_port, self.plain_port)):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mosquitto did not start; see {self.root}")
            time.sleep(POLL_S)
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self) -> None:
        stop_process(self.process)


def _connectable(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1.0):
            return True
    except OSError:
        return False


def mosquitto_version() -> str:
    for binary in (shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
        if binary and Path(binary).exists():
            found = subprocess.run(  # noqa: S603 - the installed broker
                [binary, "-h"], capture_output=True, text=True, check=False, timeout=10
            )
            return found.stdout.splitlines()[0].strip() if found.stdout else "?"
    return "not installed"


# -- the observer -----------------------------------------------------------------------------


class Observer(asyncio.Protocol):
    """Subscribed to fleet/# on mosquitto's plain listener; counts payloads by their tag."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.counts: Counter[bytes] = Counter()
        self.subscribed: asyncio.Future[None] = loop.create_future()
        self._buffer = b""

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        position = 0
        while (found := next_packet(buffer, position)) is not None:
            first, body, end = found
            kind = first >> 4
            if kind == 3:  # PUBLISH
                topic_end = body + 2 + int.from_bytes(buffer[body : body + 2], "big")
                payload_at = topic_end + (2 if first & 0x06 else 0)
                self.counts[bytes(buffer[payload_at : buffer.index(b"|", payload_at, end)])] += 1
            elif kind == 9 and not self.subscribed.done():  # SUBACK
                self.subscribed.set_result(None)
            position = end
        self._buffer = buffer[position:]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.subscribed.done():
            self.subscribed.set_exception(exc or ConnectionResetError("observer closed"))

    @classmethod
    async def attach(cls, port: int) -> tuple[asyncio.Transport, Observer]:
        loop = asyncio.get_running_loop()
        transport, observer = await loop.create_connection(lambda: cls(loop), HOST, port)
        transport.write(encode_connect("bench-observer") + encode_subscribe("fleet/#"))
        async with asyncio.timeout(10):
            await observer.subscribed
        return transport, observer

    async def settle(self, tag: bytes, expected: int, timeout_s: float) -> int:
        """Wait until ``expected`` messages tagged ``tag`` arrived, or the count stops moving
        for a second; the count."""
        deadline = time.monotonic() + timeout_s
        last, still_since = -1, time.monotonic()
        while self.counts[tag] < expected and time.monotonic() < deadline:
            if self.counts[tag] != last:
                last, still_since = self.counts[tag], time.monotonic()
            elif time.monotonic() - still_since > 1.0:
                break
            await asyncio.sleep(POLL_S)
        return self.counts[tag]


# -- one run ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    devices: int
    workers: int
    clients: int
    rate: float
    duration_s: float
    payload_bytes: int
    qos: tuple[int, ...]
    connect_concurrency: int
    connect_timeout_s: float
    idle_window_s: float
    log_level: str
    upstream: str  # tls (the device's certificate) | plain (unsafe_plaintext, for comparison)
    reconnects: int
    session_resumption: bool = True
    relay: str = "compiled"  # compiled | python (FLEETGATE_RELAY=python), to compare
    device_tls: bool = False  # the devices speak TLS to fleetgate (a tls listener)


def gateway_env(
    settings: Settings, port: int, broker: Mosquitto, server_ca: Path
) -> dict[str, str]:
    listener = f"FLEETGATE_LISTENERS__{LISTENER.upper()}__"
    env = {
        "FLEETGATE_NODE__WORKERS": str(settings.workers),
        **({"FLEETGATE_RELAY": "python"} if settings.relay == "python" else {}),
        f"{listener}PROTOCOL": "mqtt",
        f"{listener}BIND": f"{HOST}:{port}",
        f"{listener}DESTINATION": "broker",
        f"{listener}MAX_CONNECTIONS": str(settings.devices + 1000),
    }
    if settings.device_tls:
        env[f"{listener}TLS__MODE"] = "tls"
        env[f"{listener}TLS__SERVER_NAMES"] = '["localhost"]'

    destination = "FLEETGATE_DESTINATIONS__BROKER__"
    if settings.upstream == "plain":
        env[f"{destination}ADDRESS"] = f"{HOST}:{broker.plain_port}"
        env[f"{destination}UNSAFE_PLAINTEXT"] = "true"
        return env
    env[f"{destination}ADDRESS"] = f"{HOST}:{broker.tls_port}"
    env[f"{destination}SERVER_NAME"] = "localhost"
    env[f"{destination}CA_FILE"] = str(server_ca)
    env[f"{destination}CREDENTIAL"] = "device-#{device_id}"
    env[f"{destination}SESSION_RESUMPTION"] = str(settings.session_resumption).lower()
    return env


def _per(total: float, count: float, scale: float) -> float:
    return round(total / count * scale, 2) if count else math.nan


async def measure_publish(
    qos: int,
    tag: str,
    settings: Settings,
    pool: ClientPool,
    observer: Observer,
    gateway: Fleetgate,
    broker: Mosquitto,
    idle_cpu_per_s: tuple[float, float],
) -> dict[str, Any]:
    payload = (tag + "|").ljust(settings.payload_bytes, "x")
    share = settings.rate / len(pool.processes)
    gw0, mq0, t0 = Usage.of(gateway.pid), Usage.of(broker.pid), time.monotonic()
    replies = await pool.command(
        lambda _: {
            "cmd": "publish",
            "qos": qos,
            "rate": share,
            "duration_s": settings.duration_s,
            "payload": payload,
            "drain_s": 15.0,
        }
    )
    sent = sum(r["sent"] for r in replies)
    delivered = await observer.settle(tag.encode(), sent, timeout_s=30)
    gw1, mq1, t1 = Usage.of(gateway.pid), Usage.of(broker.pid), time.monotonic()
    window = t1 - t0
    gw_cpu, mq_cpu = gw1.cpu_s - gw0.cpu_s, mq1.cpu_s - mq0.cpu_s
    gw_system = gw1.system_s - gw0.system_s
    latencies = [x for r in replies for x in r["ack_latencies_s"]]
    return {
        "qos": qos,
        "sent": sent,
        "offered_per_s": round(sent / max(r["wall_s"] for r in replies)),
        "delivered": delivered,
        "delivered_ratio": round(delivered / sent, 4) if sent else math.nan,
        "acked": sum(r["acked"] for r in replies) if qos else None,
        "ack_p50_ms": round(percentile(latencies, 0.5) * 1e3, 2) if qos else None,
        "ack_p99_ms": round(percentile(latencies, 0.99) * 1e3, 2) if qos else None,
        "fleetgate_cpu_us_per_msg": _per(gw_cpu, sent, 1e6),
        "fleetgate_cpu_us_per_msg_less_idle": _per(gw_cpu - idle_cpu_per_s[0] * window, sent, 1e6),
        "fleetgate_cpu_pct": round(gw_cpu / window * 100, 1),
        "fleetgate_cpu_system_share": round(gw_system / gw_cpu, 2) if gw_cpu else math.nan,
        "mosquitto_cpu_us_per_msg": _per(mq_cpu, sent, 1e6),
        "mosquitto_cpu_us_per_msg_less_idle": _per(mq_cpu - idle_cpu_per_s[1] * window, sent, 1e6),
        "alive_after": sum(r["alive"] for r in replies),
    }


async def measure_reconnect(
    settings: Settings, pool: ClientPool, gateway: Fleetgate, broker: Mosquitto, fresh: Usage
) -> dict[str, Any]:
    """Every device drops its connection, then connects again: what fleetgate keeps for devices
    that are gone (RSS against the fresh gateway), and what a reconnection costs once its caches
    are warm (in the worker it lands on: SO_REUSEPORT picks one per connection)."""
    closed = sum(r["closed"] for r in await pool.command(lambda _: {"cmd": "close"}))
    for _ in range(int(60 / POLL_S)):  # until fleetgate has closed both ends of every relay
        if Usage.of(gateway.pid).fds <= fresh.fds + 10:
            break
        await asyncio.sleep(POLL_S)
    gone = Usage.of(gateway.pid)
    # What it gives back: the tunnel core returns freed memory to the system at most every
    # TRIM_EVERY_S (10 s) once many connections ended; past that, RSS is what it keeps.
    await asyncio.sleep(SETTLE_S)
    settled = Usage.of(gateway.pid)
    mq0 = Usage.of(broker.pid)
    connect = merge_connects(
        await pool.command(
            lambda _: {
                "cmd": "connect",
                "count": settings.devices,
                "concurrency": math.ceil(settings.connect_concurrency / settings.clients),
                "timeout_s": settings.connect_timeout_s,
            }
        )
    )
    again, mq1 = Usage.of(gateway.pid), Usage.of(broker.pid)
    connected = connect["connected"]
    return {
        "closed": closed,
        "fleetgate_rss_mib_after_all_closed": round(gone.rss_kib / 1024, 1),
        "fleetgate_rss_mib_reconnected": round(again.rss_kib / 1024, 1),
        "fleetgate_kib_per_device_after_all_closed": _per(gone.rss_kib - fresh.rss_kib, closed, 1),
        "fleetgate_rss_mib_settled": round(settled.rss_kib / 1024, 1),
        "fleetgate_kib_per_device_settled": _per(settled.rss_kib - fresh.rss_kib, closed, 1),
        "fleetgate_open_fds_after_all_closed": gone.fds,
        "connected": connected,
        "failures": connect["failures"],
        "per_s": round(connected / connect["wall_s"]) if connect["wall_s"] else 0,
        "p50_ms": connect["p50_ms"],
        "fleetgate_cpu_ms_per_conn": _per(again.cpu_s - gone.cpu_s, connected, 1e3),
        "mosquitto_cpu_ms_per_conn": _per(mq1.cpu_s - mq0.cpu_s, connected, 1e3),
        "fleetgate_kib_per_device_reconnected": _per(again.rss_kib - fresh.rss_kib, connected, 1),
    }


async def one_run(
    number: int, settings: Settings, work: Path, data_dir: Path, server_ca: TestCA
) -> dict[str, Any]:
    run_dir = work / f"run-{number}"
    run_dir.mkdir()
    server = server_ca.issue_server().write(run_dir, "broker")
    ca_file = server_ca.write_bundle(run_dir / "broker-ca.pem")
    broker = Mosquitto(run_dir, free_port(), free_port())
    gateway = Fleetgate(data_dir, run_dir / "fleetgate.log", free_port())
    listen_port = free_port()
    indices = list(range(settings.devices))
    pool = ClientPool(run_dir, HOST, listen_port, split(indices, settings.clients))
    observer_transport: asyncio.Transport | None = None
    try:
        broker.start(data_dir / "bench-fleetgate-ca.pem", server.cert, server.key)
        gateway.start(
            gateway_env(settings, listen_port, broker, ca_file),
            log_level=settings.log_level,
        )
        gateway.wait_for("listener.bound", settings.workers)
        if settings.device_tls:
            async with httpx.AsyncClient(timeout=30) as http:
                root = await http.get(f"{gateway.url}/pki/root.pem")
            root.raise_for_status()
            pool.cafile = run_dir / "fleetgate-root.pem"
            pool.cafile.write_bytes(root.content)
        observer_transport, observer = await Observer.attach(broker.plain_port)
        await pool.start()
        gw_idle0, mq_idle0 = Usage.of(gateway.pid), Usage.of(broker.pid)
        per_client = math.ceil(settings.connect_concurrency / settings.clients)
        connect = merge_connects(
            await pool.command(
                lambda _: {
                    "cmd": "connect",
                    "count": settings.devices,
                    "concurrency": per_client,
                    "timeout_s": settings.connect_timeout_s,
                }
            )
        )
        gw_conn, mq_conn = Usage.of(gateway.pid), Usage.of(broker.pid)
        await asyncio.sleep(settings.idle_window_s)  # the idle CPU rate, all devices connected
        gw_idle, mq_idle = Usage.of(gateway.pid), Usage.of(broker.pid)
        idle = (
            (gw_idle.cpu_s - gw_conn.cpu_s) / settings.idle_window_s,
            (mq_idle.cpu_s - mq_conn.cpu_s) / settings.idle_window_s,
        )
        connected = connect["connected"]
        result: dict[str, Any] = {
            "run": number,
            "devices": settings.devices,
            "workers": settings.workers,
            "gateway_processes": gw_conn.processes,
            "connect": {
                **connect,
                "per_s": round(connected / connect["wall_s"]) if connect["wall_s"] else 0,
                "fleetgate_cpu_ms_per_conn": _per(gw_conn.cpu_s - gw_idle0.cpu_s, connected, 1e3),
                "mosquitto_cpu_ms_per_conn": _per(mq_conn.cpu_s - mq_idle0.cpu_s, connected, 1e3),
            },
            "fleetgate_rss_mib_before": round(gw_idle0.rss_kib / 1024, 1),
            "fleetgate_rss_mib_connected": round(gw_conn.rss_kib / 1024, 1),
            "fleetgate_kib_per_device": _per(gw_conn.rss_kib - gw_idle0.rss_kib, connected, 1),
            "mosquitto_rss_mib_connected": round(mq_conn.rss_kib / 1024, 1),
            "mosquitto_kib_per_device": _per(mq_conn.rss_kib - mq_idle0.rss_kib, connected, 1),
            "fleetgate_idle_cpu_pct": round(idle[0] * 100, 1),
            "mosquitto_idle_cpu_pct": round(idle[1] * 100, 1),
        }
        for qos in settings.qos:
            result[f"qos{qos}"] = await measure_publish(
                qos, f"r{number}q{qos}", settings, pool, observer, gateway, broker, idle
            )
        for _ in range(settings.reconnects):
            again = await measure_reconnect(settings, pool, gateway, broker, gw_idle0)
            result["reconnect"] = again  # the last cycle's figures (medians); every cycle's RSS:
            result.setdefault("reconnect_rss_mib", []).append(
                [
                    again["fleetgate_rss_mib_after_all_closed"],
                    again["fleetgate_rss_mib_reconnected"],
                ]
            )
        result["fleetgate_refusals"] = gateway.refusals()
        return result
    finally:
        if observer_transport is not None:
            observer_transport.abort()
        await pool.stop()
        gateway.stop()
        broker.stop()


def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of every numeric leaf over the runs."""

    def leaves(value: Any, prefix: str) -> Iterable[tuple[str, float]]:
        if isinstance(value, dict):
            for key, inner in value.items():
                yield from leaves(inner, f"{prefix}{key}.")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            yield prefix.rstrip("."), float(value)

    collected: dict[str, list[float]] = {}
    for run in runs:
        for key, number in leaves(run, ""):
            collected.setdefault(key, []).append(number)
    return {
        key: round(statistics.median(values), 2)
        for key, values in collected.items()
        if key not in ("run", "devices", "workers") and not any(map(math.isnan, values))
    }


def machine() -> dict[str, Any]:
    return {
        "date": datetime.now(UTC).date().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"{round(os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30)} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION,
        "mosquitto": mosquitto_version(),
        "nofile_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[1],
    }


def summary(settings: Settings, marker: Mapping[str, Any], mid: Mapping[str, float]) -> str:
    lines = [
        f"mqtt_fleet: {settings.devices} devices, {settings.workers} fleetgate processes, "
        f"{settings.clients} client processes; medians",
        f"  registration (once): {marker.get('registered_per_s')} devices+certificates/s",
        f"  connect: {mid.get('connect.connected')} connected, "
        f"{mid.get('connect.per_s')}/s, p50 {mid.get('connect.p50_ms')} ms, "
        f"p99 {mid.get('connect.p99_ms')} ms; fleetgate "
        f"{mid.get('connect.fleetgate_cpu_ms_per_conn')} CPU ms/conn, mosquitto "
        f"{mid.get('connect.mosquitto_cpu_ms_per_conn')}",
        f"  memory: fleetgate {mid.get('fleetgate_rss_mib_before')} -> "
        f"{mid.get('fleetgate_rss_mib_connected')} MiB = "
        f"{mid.get('fleetgate_kib_per_device')} KiB per device; mosquitto "
        f"{mid.get('mosquitto_kib_per_device')} KiB per device",
    ]
    for qos in settings.qos:
        key = f"qos{qos}."
        lines.append(
            f"  QoS {qos}: {mid.get(key + 'sent')} sent at {mid.get(key + 'offered_per_s')}/s, "
            f"delivered {mid.get(key + 'delivered_ratio')}; fleetgate "
            f"{mid.get(key + 'fleetgate_cpu_us_per_msg')} CPU µs/msg "
            f"({mid.get(key + 'fleetgate_cpu_us_per_msg_less_idle')} less idle, "
            f"{mid.get(key + 'fleetgate_cpu_pct')} % CPU, system share "
            f"{mid.get(key + 'fleetgate_cpu_system_share')}); mosquitto "
            f"{mid.get(key + 'mosquitto_cpu_us_per_msg')} µs/msg"
            + (
                f"; PUBACK p50 {mid.get(key + 'ack_p50_ms')} ms p99 {mid.get(key + 'ack_p99_ms')}"
                if qos
                else ""
            )
        )
    if "reconnect.connected" in mid:
        again = {k.removeprefix("reconnect."): v for k, v in mid.items()}
        lines.append(
            f"  all closed: fleetgate keeps {again['fleetgate_kib_per_device_after_all_closed']}"
            f" KiB per device gone, {again['fleetgate_kib_per_device_settled']} after "
            f"{SETTLE_S:.0f} s; reconnect: {again['connected']} at {again['per_s']}/s, "
            f"fleetgate {again['fleetgate_cpu_ms_per_conn']} CPU ms/conn, mosquitto "
            f"{again['mosquitto_cpu_ms_per_conn']}"
        )
    return "\n".join(lines)


async def orchestrate(args: argparse.Namespace, work: Path, data_dir: Path) -> None:
    settings = Settings(
        devices=args.devices,
        workers=args.workers,
        clients=args.clients,
        rate=args.rate,
        duration_s=args.duration_s,
        payload_bytes=args.payload_bytes,
        qos=tuple(int(q) for q in args.qos.split(",")),
        connect_concurrency=args.connect_concurrency,
        connect_timeout_s=args.connect_timeout_s,
        idle_window_s=args.idle_window_s,
        log_level=args.log_level,
        upstream=args.upstream,
        reconnects=args.reconnects,
        session_resumption=not args.no_session_resumption,
        relay=args.relay,
        device_tls=args.device_tls,
    )
    marker = await asyncio.to_thread(
        prepare_devices,
        data_dir,
        work,
        settings.devices,
        kind="mqtt_fleet",
        concurrency=args.register_concurrency,
    )
    server_ca = TestCA.create("bench broker CA")
    runs = []
    for number in range(args.repeat):
        result = await one_run(number, settings, work, data_dir, server_ca)
        runs.append(result)
        print(json.dumps(result), flush=True)
    mid = medians(runs)
    print(
        json.dumps(
            {
                **machine(),
                "settings": settings.__dict__,
                "registration": marker,
                "runs": len(runs),
                "medians": mid,
            }
        ),
        flush=True,
    )
    print(summary(settings, marker, mid), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2, help="fleetgate node.workers")
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument("--rate", type=float, default=5000.0, help="messages/s in total")
    parser.add_argument("--duration-s", type=float, default=20.0)
    parser.add_argument("--payload-bytes", type=int, default=100)
    parser.add_argument("--qos", default="0,1")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--connect-concurrency", type=int, default=200)
    parser.add_argument("--connect-timeout-s", type=float, default=60.0)
    parser.add_argument("--idle-window-s", type=float, default=5.0)
    parser.add_argument("--register-concurrency", type=int, default=16)
    parser.add_argument("--log-level", default="info", help="fleetgate's log level")
    parser.add_argument(
        "--upstream",
        choices=["tls", "plain"],
        default="tls",
        help="plain: unsafe_plaintext to mosquitto's plain listener, to compare",
    )
    parser.add_argument(
        "--reconnects",
        type=int,
        default=1,
        help="cycles of every device closing and connecting again (0: none)",
    )
    parser.add_argument(
        "--no-session-resumption",
        action="store_true",
        help="destination session_resumption = false",
    )
    parser.add_argument(
        "--relay",
        choices=["compiled", "python"],
        default="compiled",
        help="python: FLEETGATE_RELAY=python (the splice relays in Python), to compare",
    )
    parser.add_argument(
        "--device-tls",
        action="store_true",
        help="the devices speak TLS to fleetgate (a tls listener, fleetgate's root trusted)",
    )
    parser.add_argument("--data", type=Path, help="keep registered devices here across runs")
    parser.add_argument("--role", choices=["orchestrator", "client"], default="orchestrator")
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--devices-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--device-cafile", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    import uvloop

    if args.role == "client":
        host, _, port = args.target.rpartition(":")
        raise_nofile()
        devices = json.loads(args.devices_file.read_text())
        uvloop.run(client_role(host, int(port), devices, args.device_cafile))
        return
    limit = raise_nofile()
    per_process = limit - 500
    if math.ceil(args.devices / args.clients) > per_process:
        raise SystemExit(f"--clients {args.clients}: over {per_process} connections per process")
    if math.ceil(2 * args.devices / args.workers) > per_process:
        raise SystemExit(f"--workers {args.workers}: each connection costs fleetgate 2 fds")
    exit_on_signals()
    work = Path(tempfile.mkdtemp(prefix="fleetgate-bench-"))
    try:
        data_dir = args.data.resolve() if args.data else work / "data"
        uvloop.run(orchestrate(args, work, data_dir))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
