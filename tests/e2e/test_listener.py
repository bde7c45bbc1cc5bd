"""The plain TCP listener: source address -> registered device -> relay to forward_to."""

from __future__ import annotations

import socket
from dataclasses import dataclass

import pytest

from e2e.conftest import ADMIN
from e2e.gateway import Gateway, GatewayFactory, free_port


@dataclass(frozen=True)
class Relay:
    gateway: Gateway
    port: int  # the listener's


@pytest.fixture
def relay(gateway_factory: GatewayFactory, echo_server: int) -> Relay:
    port = free_port()
    gw = gateway_factory(
        FLEETGATE_ADMIN_TOKEN=ADMIN,
        FLEETGATE_LISTENERS__PLC__BIND=f"127.0.0.1:{port}",
        FLEETGATE_LISTENERS__PLC__FORWARD_TO=f"127.0.0.1:{echo_server}",
    ).start()
    gw.wait_for("listener.bound")
    return Relay(gw, port)


def _exchange(port: int, payload: bytes, source: str = "127.0.0.1") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        received = bytearray()
        while chunk := s.recv(65536):
            received += chunk
        return bytes(received)


def _refused(port: int, source: str) -> bool:
    """Whether the listener closed a new connection without relaying a byte (a reset or an
    end of stream, whichever reaches the client first)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as s:
        try:
            s.sendall(b"hello?")
            return s.recv(100) == b""
        except OSError:  # reset, or not connected any more
            return True


def test_registered_device_is_relayed_with_half_close(relay: Relay) -> None:
    relay_gateway = relay.gateway
    with relay_gateway.client(ADMIN) as api:
        assert api.post("/v1/devices", json={"id": "plc-1", "addresses": ["127.0.0.1"]}).is_success
    payload = bytes(range(256)) * 4096  # 1 MiB: crosses many reads and back-pressure
    assert _exchange(relay.port, payload) == payload
    closed = relay_gateway.wait_for("listener.closed")
    assert closed["device"] == "plc-1"
    assert closed["up_bytes"] == closed["down_bytes"] == len(payload)
    with relay_gateway.client(None) as api:
        metrics = api.get("/metrics").text
    series = 'fleetgate_listener_connections_total{listener="plc",outcome="relayed",process="main"}'
    assert f"{series} 1.0" in metrics


def test_unknown_and_disabled_devices_are_refused_and_logged(relay: Relay) -> None:
    relay_gateway, port = relay.gateway, relay.port
    assert _exchange(port, b"hello", source="127.0.0.2") == b""
    refused = relay_gateway.wait_for("listener.refused")
    assert refused["reason"] == "unknown_device"
    assert refused["source"] == "127.0.0.2"

    with relay_gateway.client(ADMIN) as api:
        body = {"id": "plc-2", "addresses": ["127.0.0.2"], "status": "disabled"}
        assert api.post("/v1/devices", json=body).is_success
    assert _exchange(port, b"hello", source="127.0.0.2") == b""
    relay_gateway.wait_for("listener.refused", lambda e: e["reason"] == "device_disabled")

    with relay_gateway.client(ADMIN) as api:
        assert api.patch("/v1/devices/plc-2", json={"status": "enabled"}).is_success
    assert _exchange(port, b"hello", source="127.0.0.2") == b"hello"


def test_unreachable_destination_is_logged(gateway_factory: GatewayFactory) -> None:
    port = free_port()
    gw = gateway_factory(
        FLEETGATE_ADMIN_TOKEN=ADMIN,
        FLEETGATE_LISTENERS__PLC__BIND=f"127.0.0.1:{port}",
        FLEETGATE_LISTENERS__PLC__FORWARD_TO=f"127.0.0.1:{free_port()}",
    ).start()
    with gw.client(ADMIN) as api:
        assert api.post("/v1/devices", json={"id": "d", "addresses": ["127.0.0.1"]}).is_success
    assert _exchange(port, b"x") == b""
    failed = gw.wait_for("upstream.refused")
    assert failed["reason"] == "connect_failed"
    assert failed["device"] == "d"


def test_listener_that_cannot_bind_makes_readyz_fail(gateway_factory: GatewayFactory) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        gw = gateway_factory(
            FLEETGATE_ADMIN_TOKEN=ADMIN,
            FLEETGATE_LISTENERS__PLC__BIND=f"127.0.0.1:{busy}",
            FLEETGATE_LISTENERS__PLC__FORWARD_TO="127.0.0.1:9",
        ).start()
        with gw.client(None) as api:
            ready = api.get("/readyz")
        assert ready.status_code == 503
        assert "cannot bind" in ready.json()["checks"]["listeners"]["plc"]


def test_disabling_a_device_cuts_its_live_connection_only(relay: Relay) -> None:
    gw, port = relay.gateway, relay.port
    with gw.client(ADMIN) as api:
        for device, address in (("plc-a", "127.0.0.1"), ("plc-b", "127.0.0.3")):
            body = {"id": device, "addresses": [address]}
            assert api.post("/v1/devices", json=body).is_success
    kept = socket.create_connection(
        ("127.0.0.1", port), timeout=10, source_address=("127.0.0.3", 0)
    )
    doomed = socket.create_connection(("127.0.0.1", port), timeout=10)
    with kept, doomed:
        for s in (kept, doomed):  # both relayed end to end before the change
            s.sendall(b"ping")
            assert s.recv(16) == b"ping"
        mark = gw.mark()
        with gw.client(ADMIN) as api:
            assert api.patch("/v1/devices/plc-a", json={"status": "disabled"}).is_success
        cut = gw.wait_for("listener.connection_cut", since=mark, timeout_s=10)
        assert cut["device"] == "plc-a"
        assert cut["reason"] == "device_disabled"
        ended = gw.wait_for("listener.closed", since=mark, timeout_s=10)
        assert ended["device"] == "plc-a"
        assert ended["reason"] == "cancelled"
        assert doomed.recv(16) == b""  # closed by the gateway
        kept.sendall(b"still here")
        assert kept.recv(32) == b"still here"


def test_caps_per_source_and_per_device_refuse_one_too_many(
    gateway_factory: GatewayFactory, echo_server: int
) -> None:
    port = free_port()
    gw = gateway_factory(
        FLEETGATE_ADMIN_TOKEN=ADMIN,
        FLEETGATE_LISTENERS__PLC__BIND=f"127.0.0.1:{port}",
        FLEETGATE_LISTENERS__PLC__FORWARD_TO=f"127.0.0.1:{echo_server}",
        FLEETGATE_LISTENERS__PLC__MAX_PER_SOURCE="2",
        FLEETGATE_LISTENERS__PLC__MAX_PER_DEVICE="3",
    ).start()
    gw.wait_for("listener.bound")
    with gw.client(ADMIN) as api:
        body = {"id": "plc-cap", "addresses": ["127.0.0.1", "127.0.0.2"]}
        assert api.post("/v1/devices", json=body).is_success

    def held(source: str) -> socket.socket:
        """A connection the device keeps open, proven relayed by an echo."""
        s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
        s.sendall(b"up")
        assert s.recv(2) == b"up"
        return s

    open_ = [held("127.0.0.1"), held("127.0.0.1")]
    try:
        mark = gw.mark()
        assert _refused(port, "127.0.0.1")  # a third from one source
        assert gw.wait_for("listener.refused", since=mark)["reason"] == "source_limit"
        open_.append(held("127.0.0.2"))  # the device's third, from its other address
        mark = gw.mark()
        assert _refused(port, "127.0.0.2")
        assert gw.wait_for("listener.refused", since=mark)["reason"] == "device_limit"
    finally:
        for s in open_:
            s.close()
