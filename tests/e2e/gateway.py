"""Running the real ``fleetgate serve`` as a child process and reading its JSON log."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

STARTUP_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def fleetgate_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "fleetgate", *args]


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETGATE_")}
    env.update(extra)
    return env


@dataclass
class Gateway:
    data_dir: Path
    port: int
    env: dict[str, str]
    process: subprocess.Popen[str] | None = None
    stdout_lines: list[str] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    exited: bool = False
    _changed: threading.Condition = field(default_factory=threading.Condition)
    _threads: list[threading.Thread] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, wait: bool = True) -> Gateway:
        env = {
            **self.env,
            "FLEETGATE_API__LISTEN": f"127.0.0.1:{self.port}",
            "FLEETGATE_LOG__FORMAT": "json",
            "FLEETGATE_LOG__LEVEL": self.env.get("FLEETGATE_LOG__LEVEL", "info"),
        }
        self.stdout_lines = []
        self.events = []
        self.exited = False
        self.process = subprocess.Popen(
            fleetgate_argv("serve", "--data", str(self.data_dir)),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        assert self.process.stderr is not None
        self._threads = [
            threading.Thread(target=self._read_stdout, args=(self.process.stdout,), daemon=True),
            threading.Thread(target=self._read_log, args=(self.process.stderr,), daemon=True),
        ]
        for t in self._threads:
            t.start()
        if wait:
            self.wait_for("gateway.started")
        return self

    def _read_stdout(self, stream: Any) -> None:
        for line in stream:
            self.stdout_lines.append(line.rstrip("\n"))

    def _read_log(self, stream: Any) -> None:
        for line in stream:
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "unparsed", "line": line.rstrip("\n")}
            with self._changed:
                self.events.append(event)
                self._changed.notify_all()
        with self._changed:
            self.exited = True  # the process closed its log: it is exiting
            self._changed.notify_all()

    def mark(self) -> int:
        """A position in the log; ``wait_for(..., since=mark)`` looks only at later events."""
        with self._changed:
            return len(self.events)

    def wait_for(
        self,
        name: str,
        predicate: Callable[[dict[str, Any]], bool] = lambda _: True,
        *,
        since: int = 0,
        timeout_s: float = STARTUP_TIMEOUT_S,
    ) -> dict[str, Any]:
        """Block until the gateway logs ``name`` (matching ``predicate``); fail if it exits."""
        deadline = time.monotonic() + timeout_s
        position = since
        with self._changed:
            while True:
                for event in self.events[position:]:
                    if event.get("event") == name and predicate(event):
                        return event
                position = len(self.events)
                if self.exited:
                    raise AssertionError(f"gateway exited before {name}; log: {self.events}")
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._changed.wait(remaining):
                    raise AssertionError(f"no {name} within {timeout_s}s; log: {self.events}")

    def client(self, token: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=10)

    def signal(self, sig: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def wait_exit(self, timeout_s: float = 30) -> int:
        assert self.process is not None
        code = self.process.wait(timeout=timeout_s)
        for t in self._threads:
            t.join(timeout=5)
        return code

    def stop(self) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.signal(signal.SIGTERM)
        return self.wait_exit()

    def kill9(self) -> None:
        self.signal(signal.SIGKILL)
        self.wait_exit()


GatewayFactory = Callable[..., Gateway]


def run_cli(
    gateway: Gateway, *args: str, token: str | None, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the ``fleetgate`` CLI against ``gateway`` the way a person would."""
    cli_env = base_env(**{"FLEETGATE_URL": gateway.url, **(dict(env) if env else {})})
    if token is not None:
        cli_env["FLEETGATE_TOKEN"] = token
    # No CLI config file from the developer's home may leak into a test: point at an empty one.
    empty = gateway.data_dir.parent / "empty-cli.toml"
    if not empty.exists():
        empty.touch(mode=0o600)
    cli_env.setdefault("FLEETGATE_CLI_CONFIG", str(empty))
    return subprocess.run(
        fleetgate_argv(*args), env=cli_env, capture_output=True, text=True, timeout=60, check=False
    )
