from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e.gateway import Gateway, GatewayFactory, base_env, free_port

ADMIN = "test-admin-token"


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[GatewayFactory]:
    started: list[Gateway] = []

    def make(data_dir: Path | None = None, **env: str) -> Gateway:
        gateway = Gateway(
            data_dir=data_dir or tmp_path / f"data{len(started)}",
            port=free_port(),
            env=base_env(**env),
        )
        started.append(gateway)
        return gateway

    yield make
    for gateway in started:
        if gateway.process is not None and gateway.process.poll() is None:
            gateway.process.kill()
            gateway.wait_exit()


@pytest.fixture
def gateway(gateway_factory: GatewayFactory) -> Gateway:
    """A running gateway on SQLite whose first admin token is ADMIN."""
    return gateway_factory(FLEETGATE_ADMIN_TOKEN=ADMIN).start()


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        while data := sock.recv(65536):
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)  # echo the half-close back


@pytest.fixture
def echo_server() -> Iterator[int]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
