"""What keeps a listener serving when its configuration or material goes wrong, and what it
gives away before it refuses:

- a reload through the API with an invalid configuration file answers 409 and changes nothing;
- a changed listener whose new TLS material does not load keeps running with the old;
- a connection over the caps is reset before the TLS handshake (no certificate is sent);
- a reload that changes a listener does not reset its caps: what the retired instance still
  holds counts until it ends;
- an mtls listener loads every CRL fleetgate refreshes (the one it holds would expire).
"""

from __future__ import annotations

import contextlib
import signal
import socket
import ssl
from pathlib import Path

from e2e.conftest import ADMIN
from e2e.gateway import Gateway, GatewayFactory, free_port
from e2e.pki_support import add_device, fetch, served_certificate, tls_listener_env
from support.certs import CertFiles, TestCA
from support.mqtt_peer import HOST, TIMEOUT_S


def _append(gateway: Gateway, text: str) -> None:
    with gateway.data_dir.joinpath("fleetgate.toml").open("a") as out:
        out.write(text)


def _files_listener(name: str, port: int, echo: int, files: CertFiles, timeout_s: float) -> str:
    return (
        f'\n[listeners.{name}]\nprotocol = "tcp"\nbind = "{HOST}:{port}"\n'
        f'forward_to = "{HOST}:{echo}"\n'
        f'\n[listeners.{name}.tls]\nmode = "tls"\ncert_file = "{files.cert}"\n'
        f'key_file = "{files.key}"\nhandshake_timeout_s = {timeout_s}\n'
    )


def test_an_api_reload_of_an_invalid_file_answers_409_and_keeps_the_old(
    gateway_factory: GatewayFactory,
) -> None:
    gateway = gateway_factory(FLEETGATE_ADMIN_TOKEN=ADMIN).start()
    _append(gateway, "\n[listeners.broken]\nbind = 'nowhere'\n")
    with gateway.client(ADMIN) as api:
        answer = api.post("/v1/node/reload")
    assert answer.status_code == 409, answer.text
    assert "nothing was reloaded" in answer.json()["detail"]
    assert "listeners.broken.bind" in answer.json()["detail"]
    failed = gateway.wait_for("config.reload_failed")
    assert failed["kept"] == "previous configuration"


def test_a_changed_listener_whose_new_certificate_does_not_load_keeps_serving(
    gateway_factory: GatewayFactory, echo_server: int, tmp_path: Path
) -> None:
    ca = TestCA.create("listener guard CA")
    cafile = ca.write_bundle(tmp_path / "ca.pem")
    good = ca.issue_server().write(tmp_path, "good")
    port = free_port()
    gateway = gateway_factory(FLEETGATE_ADMIN_TOKEN=ADMIN).start()
    config = gateway.data_dir / "fleetgate.toml"
    original = config.read_text()
    mark = gateway.mark()
    _append(gateway, _files_listener("guarded", port, echo_server, good, 10.0))
    gateway.signal(signal.SIGHUP)
    gateway.wait_for("listener.bound", lambda e: e["listener"] == "guarded", since=mark)
    serving = served_certificate(port, cafile=cafile).serial_number

    # The listener changes (another timeout) and its new certificate file is garbage.
    broken = CertFiles(tmp_path / "broken.crt", good.key)
    broken.cert.write_text("-----BEGIN CERTIFICATE-----\nnot one\n")
    mark = gateway.mark()
    config.write_text(original + _files_listener("guarded", port, echo_server, broken, 20.0))
    with gateway.client(ADMIN) as api:
        answer = api.post("/v1/node/reload")
    assert answer.status_code == 200, answer.text
    assert answer.json()["listeners"]["guarded"] == "bound"
    failed = gateway.wait_for(
        "listener.tls_failed", lambda e: e["listener"] == "guarded", since=mark
    )
    assert "holds no PEM certificate" in failed["detail"], failed
    assert (
        served_certificate(port, cafile=cafile).serial_number == serving
    )  # still the running listener


def test_a_connection_over_the_caps_is_reset_before_any_handshake(
    gateway_factory: GatewayFactory, echo_server: int, tmp_path: Path
) -> None:
    port = free_port()
    gateway = gateway_factory(
        FLEETGATE_ADMIN_TOKEN=ADMIN,
        FLEETGATE_LISTENERS__CAPPED__MAX_PER_SOURCE="1",
        **tls_listener_env("capped", port, echo_server),
    ).start()
    gateway.wait_for("listener.bound", lambda e: e["listener"] == "capped")
    with gateway.client(ADMIN) as api:
        add_device(api, "capped-device", addresses=[HOST])
    root = fetch(gateway, "/pki/root.pem", tmp_path / "root.pem")
    context = ssl.create_default_context(cafile=root)
    with (
        socket.create_connection((HOST, port), timeout=TIMEOUT_S) as raw,
        context.wrap_socket(raw, server_hostname=HOST) as first,
    ):
        first.sendall(b"ping")
        assert first.recv(4) == b"ping"
        # A second connection from the same address: its ClientHello gets no answer at all.
        hello = ssl.MemoryBIO()
        probe = context.wrap_bio(ssl.MemoryBIO(), hello, server_hostname=HOST)
        with contextlib.suppress(ssl.SSLWantReadError):  # it waits for the server
            probe.do_handshake()
        mark = gateway.mark()
        with socket.create_connection((HOST, port), timeout=TIMEOUT_S) as second:
            second.sendall(hello.read())
            try:
                answer = second.recv(4096)
            except ConnectionResetError:
                answer = b""
        assert answer == b"", answer[:8]  # no ServerHello, no certificate
        refused = gateway.wait_for("listener.refused", since=mark)
        assert (refused["listener"], refused["reason"]) == ("capped", "source_limit")


def _plain_listener(name: str, port: int, echo: int, idle_timeout_s: float) -> str:
    return (
        f'\n[listeners.{name}]\nprotocol = "tcp"\nbind = "{HOST}:{port}"\n'
        f'forward_to = "{HOST}:{echo}"\nmax_per_source = 1\nidle_timeout_s = {idle_timeout_s}\n'
    )


def test_a_reload_that_changes_a_listener_keeps_counting_what_the_old_one_holds(
    gateway_factory: GatewayFactory, echo_server: int
) -> None:
    port = free_port()
    gateway = gateway_factory(FLEETGATE_ADMIN_TOKEN=ADMIN).start()
    with gateway.client(ADMIN) as api:
        add_device(api, "reloaded-device", addresses=[HOST])
    config = gateway.data_dir / "fleetgate.toml"
    original = config.read_text()
    mark = gateway.mark()
    config.write_text(original + _plain_listener("reloaded", port, echo_server, 300.0))
    gateway.signal(signal.SIGHUP)
    gateway.wait_for("listener.bound", lambda e: e["listener"] == "reloaded", since=mark)

    with socket.create_connection((HOST, port), timeout=TIMEOUT_S) as first:
        first.sendall(b"ping")
        assert first.recv(4) == b"ping"
        # The listener changes: a new instance takes the port, the first connection stays on
        # the retired one (still relaying) and still counts against max_per_source = 1.
        mark = gateway.mark()
        config.write_text(original + _plain_listener("reloaded", port, echo_server, 200.0))
        gateway.signal(signal.SIGHUP)
        gateway.wait_for("listener.bound", lambda e: e["listener"] == "reloaded", since=mark)
        mark = gateway.mark()
        with socket.create_connection((HOST, port), timeout=TIMEOUT_S) as second:
            second.sendall(b"over")
            try:
                answer = second.recv(4)
            except ConnectionResetError:
                answer = b""
        assert answer == b""
        refused = gateway.wait_for("listener.refused", since=mark)
        assert (refused["listener"], refused["reason"]) == ("reloaded", "source_limit")
        first.sendall(b"pong")
        assert first.recv(4) == b"pong"
        mark = gateway.mark()
    gateway.wait_for("listener.closed", lambda e: e["listener"] == "reloaded", since=mark)
    # The first connection ended: its place is free under the new settings.
    with socket.create_connection((HOST, port), timeout=TIMEOUT_S) as third:
        third.sendall(b"ping")
        assert third.recv(4) == b"ping"


def test_an_mtls_listener_loads_each_crl_fleetgate_refreshes(
    gateway_factory: GatewayFactory, echo_server: int
) -> None:
    port = free_port()
    gateway = gateway_factory(
        FLEETGATE_ADMIN_TOKEN=ADMIN,
        FLEETGATE_PKI__CRL_LIFETIME_S="600",
        FLEETGATE_PKI__CRL_REFRESH_FRACTION="0.005",  # a new CRL every 3 s
        FLEETGATE_PKI__MAINTENANCE_INTERVAL_S="1",
        FLEETGATE_LISTENERS__GUARD__IDENTITY="certificate",
        **tls_listener_env("guard", port, echo_server, mode="mtls"),
    ).start()
    gateway.wait_for("listener.bound", lambda e: e["listener"] == "guard")
    reloaded = gateway.wait_for(
        "listener.tls_reloaded",
        lambda e: e["listener"] == "guard" and e["why"] == "crl.refresh",
        timeout_s=TIMEOUT_S + 10,
    )
    assert reloaded["listener"] == "guard"
    with gateway.client(ADMIN) as api:
        refreshes = api.get("/v1/audit", params={"action": "crl.refresh"}).json()["items"]
    assert refreshes, "the refresh is in the audit log (and so on the change feed)"
