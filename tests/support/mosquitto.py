"""A throwaway mosquitto broker for tests: Debian's ``mosquitto -c <conf>`` on 127.0.0.1.

The TLS listener is the shape fleetgate's uplink meets in the field: the client must present a
certificate chaining to ``cafile`` (``require_certificate true``), the certificate's subject CN
becomes the MQTT username (``use_identity_as_username true``; whatever username the client sends
is ignored), anonymous clients are refused, TLS 1.2 is the minimum, and an ``acl_file`` given as
text decides who may publish and subscribe where. An optional plain listener admits anonymous
clients with no ACL at all: an observer's back door for tests, never a device path.

Everything is logged (``log_type all``, ``connection_messages true``) to a file that
:meth:`MosquittoBroker.wait_for_log` polls, so a test waits on what the broker actually did.
A missing ``mosquitto`` binary is a failure (:class:`MosquittoNotInstalled`), never a skip.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from support.certs import CertFiles

HOST = "127.0.0.1"
START_TIMEOUT_S = 15.0
START_ATTEMPTS = 3
_POLL_S = 0.02  # how often a wait re-checks its condition (a poll, not a guess at timing)

INSTALL_HINT = (
    "the `mosquitto` broker binary was not found (looked in /usr/sbin and on PATH). The uplink "
    "tests talk to a real broker and a missing peer is a failure, not a skip: install Debian's "
    "`mosquitto` and `mosquitto-clients` packages (scripts/test does this when run as root)."
)


class MosquittoNotInstalled(RuntimeError):
    """The broker binary (or a client tool) is missing."""


class MosquittoFailed(RuntimeError):
    """The broker exited or never became reachable (the message carries its output and log)."""


def find_binary(name: str) -> str:
    """``mosquitto`` (in /usr/sbin, not on a normal user's PATH) or a client tool."""
    for candidate in (shutil.which(name), f"/usr/sbin/{name}", f"/usr/bin/{name}"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise MosquittoNotInstalled(f"`{name}` is missing: {INSTALL_HINT}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _connectable(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1.0):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class BrokerTls:
    """The TLS listener's files: ``cafile`` verifies clients; ``server`` is what clients see."""

    cafile: Path
    server: CertFiles


@dataclass
class MosquittoBroker:
    """A running broker. Build one with :meth:`start` or :func:`running_mosquitto`."""

    root: Path
    port: int  # the TLS listener
    plain_port: int | None  # the anonymous, ACL-free listener, when asked for
    host: str = HOST
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    owns_root: bool = field(default=False, repr=False)  # stop() removes the directory

    @property
    def config_path(self) -> Path:
        return self.root / "mosquitto.conf"

    @property
    def acl_path(self) -> Path:
        return self.root / "acl"

    @property
    def log_path(self) -> Path:
        return self.root / "mosquitto.log"

    @property
    def output_path(self) -> Path:
        """The broker's stdout/stderr (config errors land here before the log file opens)."""
        return self.root / "mosquitto.out"

    # -- lifecycle -------------------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        tls: BrokerTls,
        acl: str,
        *,
        plain_listener: bool = False,
        extra_tls_config: str = "",
        directory: Path | None = None,
        timeout_s: float = START_TIMEOUT_S,
    ) -> MosquittoBroker:
        """Start a broker; returns once every listener accepts TCP connections.

        ``acl`` is the text of mosquitto's ``acl_file`` (``user dev-a`` /
        ``topic readwrite devices/dev-a/#``); ``extra_tls_config`` is appended verbatim to the
        TLS listener's section (e.g. ``crlfile /path``). ``directory`` defaults to a fresh
        temporary one, removed by :meth:`stop` (a given one is left for the test to inspect).
        """
        binary = find_binary("mosquitto")
        owned = directory is None
        root = Path(tempfile.mkdtemp(prefix="fleetgate-mqtt-")) if directory is None else directory
        root.mkdir(parents=True, exist_ok=True)
        broker = cls(root=root, port=0, plain_port=None, owns_root=owned)
        try:
            broker.acl_path.write_text(acl if acl.endswith("\n") else acl + "\n")
            broker._start_on_free_ports(binary, tls, plain_listener, extra_tls_config, timeout_s)
        except BaseException:
            broker.stop()
            raise
        return broker

    def stop(self) -> None:
        """Terminate the broker (kill it if it lingers) and remove an owned directory."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        if self.owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> MosquittoBroker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- the log ---------------------------------------------------------------------------------

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_mark(self) -> int:
        """The log's current length: pass it as ``since`` to wait only for newer lines."""
        return len(self.log_text())

    def log_lines(self, substring: str = "", *, since: int = 0) -> list[str]:
        return [line for line in self.log_text()[since:].splitlines() if substring in line]

    def wait_for_log(self, substring: str, timeout_s: float = 10.0, *, since: int = 0) -> str:
        """The first log line (after offset ``since``) containing ``substring``.

        Raises :class:`TimeoutError` with the log's tail, or :class:`MosquittoFailed` if the
        broker exits while we wait.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            if found := self.log_lines(substring, since=since):
                return found[0]
            if self.process is not None and self.process.poll() is not None:
                raise MosquittoFailed(f"broker exited while waiting for {substring!r}\n{self}")
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"no mosquitto log line containing {substring!r} within {timeout_s}s\n"
                    f"{self._tail()}"
                )
            time.sleep(_POLL_S)

    # -- internals -------------------------------------------------------------------------------

    def _config(self, tls: BrokerTls, extra_tls_config: str) -> str:
        # Running as root, mosquitto would drop to the `mosquitto` user and could no longer
        # read our 0600 keys or write the log: naming the current user keeps it as it is.
        user = pwd.getpwuid(os.geteuid()).pw_name
        lines = [
            "per_listener_settings true",
            f"user {user}",
            "persistence false",
            # A slow subscriber in a test (a paho thread on a loaded machine) must not lose
            # QoS 1/2 messages to the broker's queue limit (1,000 by default): a loss the
            # tests see has to be the gateway's.
            "max_queued_messages 0",
            f"log_dest file {self.log_path}",
            "log_type all",
            "connection_messages true",
            "log_timestamp true",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
            "",
            f"listener {self.port} {HOST}",
            "allow_anonymous false",
            f"cafile {tls.cafile}",
            f"certfile {tls.server.cert}",
            f"keyfile {tls.server.key}",
            "require_certificate true",
            "use_identity_as_username true",
            "tls_version tlsv1.2",
            f"acl_file {self.acl_path}",
            extra_tls_config,
        ]
        if self.plain_port is not None:
            lines += ["", f"listener {self.plain_port} {HOST}", "allow_anonymous true"]
        return "\n".join(lines) + "\n"

    def _start_on_free_ports(
        self,
        binary: str,
        tls: BrokerTls,
        plain_listener: bool,
        extra_tls_config: str,
        timeout_s: float,
    ) -> None:
        for attempt in range(1, START_ATTEMPTS + 1):
            self.port = free_port()
            self.plain_port = free_port() if plain_listener else None
            self.config_path.write_text(self._config(tls, extra_tls_config))
            with self.output_path.open("wb") as output:
                self.process = subprocess.Popen(
                    [binary, "-c", str(self.config_path)],
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    cwd=self.root,
                )
            try:
                self._wait_ready(timeout_s)
            except MosquittoFailed:
                self._kill()
                # Another process may take a probed port before the broker binds it.
                if attempt == START_ATTEMPTS or "Address already in use" not in self._tail():
                    raise
            else:
                return

    def _wait_ready(self, timeout_s: float) -> None:
        ports = [p for p in (self.port, self.plain_port) if p is not None]
        deadline = time.monotonic() + timeout_s
        assert self.process is not None
        while True:
            if self.process.poll() is not None:
                raise MosquittoFailed(f"mosquitto exited with {self.process.returncode}\n{self}")
            # Each probe is a TCP connect the broker logs as a failed TLS client (on the TLS
            # port) or a client that never sent CONNECT (plain port).
            if all(_connectable(p) for p in ports):
                return
            if time.monotonic() >= deadline:
                raise MosquittoFailed(f"mosquitto not reachable after {timeout_s}s\n{self}")
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=_POLL_S)

    def _kill(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(timeout=10)

    def _tail(self, lines: int = 40) -> str:
        log = "\n".join(self.log_text().splitlines()[-lines:]) or "(empty)"
        try:
            output = self.output_path.read_text(errors="replace").strip() or "(empty)"
        except FileNotFoundError:
            output = "(none)"
        return f"mosquitto output:\n{output}\nmosquitto log (tail):\n{log}"

    def __str__(self) -> str:
        return f"mosquitto on {self.host}:{self.port} in {self.root}\n{self._tail()}"


@contextlib.contextmanager
def running_mosquitto(
    tls: BrokerTls,
    acl: str,
    *,
    plain_listener: bool = False,
    extra_tls_config: str = "",
    directory: Path | None = None,
) -> Iterator[MosquittoBroker]:
    """A broker for the ``with`` block; stopped (and its temp directory removed) afterwards."""
    with MosquittoBroker.start(
        tls,
        acl,
        plain_listener=plain_listener,
        extra_tls_config=extra_tls_config,
        directory=directory,
    ) as broker:
        yield broker
