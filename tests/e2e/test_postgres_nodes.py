"""Gateway processes on a real PostgreSQL: durable, and several nodes sharing one registry."""

from __future__ import annotations

import socket

import pytest

from e2e.conftest import ADMIN
from e2e.gateway import GatewayFactory, free_port
from support.postgres import PostgresServer

pytestmark = pytest.mark.postgres


def test_two_nodes_share_devices_and_tokens(
    gateway_factory: GatewayFactory, pg_server: PostgresServer
) -> None:
    dsn = pg_server.create_database_sync()
    shared = {
        "FLEETGATE_STORE__BACKEND": "postgresql",
        "FLEETGATE_STORE__POSTGRESQL_DSN": dsn,
        "FLEETGATE_ADMIN_TOKEN": ADMIN,
    }
    first = gateway_factory(**shared).start()
    # The second node has its own data directory (and so its own master key file): it
    # shares the database, so it must share the key too.
    key = (first.data_dir / "master.key").read_text().split()[-1]
    second = gateway_factory(**shared, FLEETGATE_MASTER_KEY=key).start()
    assert any(e.get("store") == "postgresql" for e in first.events)

    with first.client(ADMIN) as api:
        created = api.post("/v1/devices", json={"id": "shared-1", "addresses": ["10.7.0.1"]})
        assert created.status_code == 201
    with second.client(ADMIN) as api:
        assert api.get("/v1/devices/shared-1").json()["addresses"] == ["10.7.0.1"]
        conflict = api.post("/v1/devices", json={"id": "other", "addresses": ["10.7.0.1"]})
        assert conflict.status_code == 409
        viewer = api.post("/v1/tokens", json={"name": "v", "role": "viewer"}).json()["secret"]
    with first.client(viewer) as api:
        assert api.get("/v1/whoami").json()["role"] == "viewer"

    # Confirmed by one node, then that node dies hard: the other still sees the write.
    with first.client(ADMIN) as api:
        assert api.post("/v1/devices", json={"id": "shared-2"}).status_code == 201
    first.kill9()
    with second.client(ADMIN) as api:
        ids = [d["id"] for d in api.get("/v1/devices").json()["items"]]
    assert ids == ["shared-1", "shared-2"]
    assert second.stop() == 0


def test_unreachable_postgresql_fails_start_without_leaking_the_password(
    gateway_factory: GatewayFactory,
) -> None:
    gw = gateway_factory(
        FLEETGATE_STORE__BACKEND="postgresql",
        FLEETGATE_STORE__POSTGRESQL_DSN="postgresql://fleet:hunter2secret@127.0.0.1:1/db",
        FLEETGATE_STORE__CONNECT_TIMEOUT_S="3",
    ).start(wait=False)
    code = gw.wait_exit()
    assert code == 74
    assert "hunter2secret" not in repr(gw.events)


def test_disabling_on_one_node_cuts_the_device_on_another(
    gateway_factory: GatewayFactory, pg_server: PostgresServer, echo_server: int
) -> None:
    dsn = pg_server.create_database_sync()
    port = free_port()
    shared = {
        "FLEETGATE_STORE__BACKEND": "postgresql",
        "FLEETGATE_STORE__POSTGRESQL_DSN": dsn,
        "FLEETGATE_ADMIN_TOKEN": ADMIN,
    }
    relaying = gateway_factory(
        **shared,
        FLEETGATE_LISTENERS__PLC__BIND=f"127.0.0.1:{port}",
        FLEETGATE_LISTENERS__PLC__FORWARD_TO=f"127.0.0.1:{echo_server}",
    ).start()
    key = (relaying.data_dir / "master.key").read_text().split()[-1]
    managing = gateway_factory(**shared, FLEETGATE_MASTER_KEY=key).start()
    with managing.client(ADMIN) as api:
        assert api.post("/v1/devices", json={"id": "plc", "addresses": ["127.0.0.1"]}).is_success
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"ping")
        assert conn.recv(16) == b"ping"
        mark = relaying.mark()
        with managing.client(ADMIN) as api:
            assert api.patch("/v1/devices/plc", json={"status": "disabled"}).is_success
        cut = relaying.wait_for("listener.connection_cut", since=mark, timeout_s=10)
        assert cut["reason"] == "device_disabled"
        assert conn.recv(16) == b""
