"""Reloading a tls listener's material while devices are connected and publishing.

The listener serves a certificate from files (an outside CA's, as when another tool renews it).
Five paho devices stay connected through it to a real mosquitto and publish QoS 1 without a
pause while the gateway is reloaded three ways: SIGHUP, ``POST /v1/node/reload`` and a new
certificate written over the files. None of them may be dropped or lose a message; each new
handshake must show the newest good certificate; a broken file must leave the old one serving.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509

from e2e.conftest import ADMIN
from e2e.gateway import Gateway, free_port
from e2e.pki_support import add_device, fetch, running_gateway
from support.certs import CertFiles, TestCA
from support.mosquitto import BrokerTls, MosquittoBroker, find_binary, running_mosquitto
from support.mqtt_peer import HOST, TIMEOUT_S, Peer, TlsFiles

DEVICES = 5


@dataclass
class Site:
    gateway: Gateway
    broker: MosquittoBroker
    port: int
    ca: TestCA
    cafile: Path
    files: CertFiles  # what the listener reads


def _install(files: CertFiles, fresh: CertFiles) -> None:
    """Put a new certificate and key in place, each file replaced whole (rename)."""
    for target, source in ((files.key, fresh.key), (files.cert, fresh.cert)):
        staging = target.with_suffix(".new")
        staging.write_bytes(source.read_bytes())
        os.replace(staging, target)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    find_binary("mosquitto")
    workdir = tmp_path_factory.mktemp("listener-reload")
    ca = TestCA.create("outside listener CA")
    cafile = ca.write_bundle(workdir / "outside-ca.pem")
    first = ca.issue_server().write(workdir / "issued", "first")
    files = CertFiles(workdir / "listener.crt", workdir / "listener.key")
    _install(files, first)
    with running_gateway(workdir / "data", FLEETGATE_ADMIN_TOKEN=ADMIN) as gateway:
        root = fetch(gateway, "/pki/root.pem", workdir / "root.pem")
        broker_cert = TestCA.create("broker").issue_server().write(workdir, "broker")
        with running_mosquitto(
            BrokerTls(root, broker_cert), "topic readwrite #\n", plain_listener=True
        ) as broker:
            port = free_port()
            tables: dict[str, dict[str, object]] = {
                "destinations.local": {
                    "address": f"{HOST}:{broker.plain_port}",
                    "unsafe_plaintext": True,
                },
                "listeners.files": {
                    "protocol": "mqtt",
                    "bind": f"{HOST}:{port}",
                    "destination": "local",
                },
                "listeners.files.tls": {
                    "mode": "tls",
                    "cert_file": str(files.cert),
                    "key_file": str(files.key),
                },
            }
            text = "".join(
                f"\n[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
                for name, values in tables.items()
            )
            mark = gateway.mark()
            with gateway.data_dir.joinpath("fleetgate.toml").open("a") as out:
                out.write(text)
            gateway.signal(signal.SIGHUP)
            gateway.wait_for("listener.bound", since=mark)
            yield Site(gateway, broker, port, ca, cafile, files)


def served_serial(site: Site) -> int:
    """The serial of the certificate a new handshake gets."""
    context = ssl.create_default_context(cafile=site.cafile)
    with (
        socket.create_connection((HOST, site.port), timeout=TIMEOUT_S) as raw,
        context.wrap_socket(raw, server_hostname=HOST) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def serial_of(files: CertFiles) -> int:
    return x509.load_pem_x509_certificate(files.cert.read_bytes()).serial_number


class Publisher(threading.Thread):
    """Publishes QoS 1 as fast as acknowledgements come, until told to stop."""

    def __init__(self, peer: Peer, topic: str) -> None:
        super().__init__(daemon=True)
        self.peer, self.topic = peer, topic
        self.sent: list[bytes] = []
        self.failure: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            for n in itertools.count():
                if self.stop.is_set():
                    return
                payload = f"{self.topic} {n}".encode()
                self.peer.publish(self.topic, payload, qos=1)
                self.sent.append(payload)
        except (AssertionError, OSError, RuntimeError, ValueError) as exc:  # for the test
            self.failure = exc


def test_reloads_under_load_drop_nobody_and_serve_the_newest_good_certificate(
    site: Site, tmp_path: Path
) -> None:
    gateway = site.gateway
    sources = [f"127.0.4.{n + 1}" for n in range(DEVICES)]
    with gateway.client(ADMIN) as api:
        for n, source in enumerate(sources):
            add_device(api, f"reload-{n}", addresses=[source])
    assert site.broker.plain_port is not None
    observer = Peer("reload-observer")
    devices = [Peer(f"reload-{n}", tls=TlsFiles(site.cafile)) for n in range(DEVICES)]
    publishers: list[Publisher] = []
    try:
        assert not observer.start(site.broker.plain_port, source=HOST).is_failure
        observer.subscribe("load/#", 1)
        for peer, source in zip(devices, sources, strict=True):
            assert not peer.start(site.port, source=source).is_failure
        publishers = [Publisher(p, f"load/{p.client_id}") for p in devices]
        for publisher in publishers:
            publisher.start()
        assert served_serial(site) == serial_of(site.files)

        # 1. SIGHUP, and 2. the API: the same files are read again.
        mark = gateway.mark()
        gateway.signal(signal.SIGHUP)
        gateway.wait_for("listener.tls_reloaded", lambda e: e["why"] == "reload", since=mark)
        mark = gateway.mark()
        with gateway.client(ADMIN) as api:
            answered = api.post("/v1/node/reload")
        assert answered.status_code == 200, answered.text
        assert answered.json()["listeners"]["files"] == "bound"
        gateway.wait_for("listener.tls_reloaded", since=mark)

        # 3. A renewed certificate written over the files: picked up without a signal.
        renewed = site.ca.issue_server().write(tmp_path, "renewed")
        mark = gateway.mark()
        _install(site.files, renewed)
        gateway.wait_for("listener.tls_reloaded", lambda e: e["why"] == "file changed", since=mark)
        assert served_serial(site) == serial_of(renewed)

        # 4. A broken file: the renewed certificate keeps being served, and the log says why.
        mark = gateway.mark()
        site.files.cert.write_text("-----BEGIN CERTIFICATE-----\nbroken\n")
        failed = gateway.wait_for("listener.tls_reload_failed", since=mark)
        assert failed["listener"] == "files", failed
        assert served_serial(site) == serial_of(renewed)
        _install(site.files, renewed)  # repaired for whoever runs next

        for publisher in publishers:
            publisher.stop.set()
        for publisher in publishers:
            publisher.join(TIMEOUT_S)
            assert publisher.failure is None, publisher.failure
            assert publisher.sent, f"{publisher.topic} published nothing"
        assert not any(p.disconnected.is_set() for p in devices), "a device was dropped"
        expected = {payload for p in publishers for payload in p.sent}
        received: set[bytes] = set()
        while not expected <= received:
            try:
                received.add(bytes(observer.next_message().payload))
            except AssertionError as missing:
                dropped = site.broker.log_lines("messages are being dropped")
                raise AssertionError(f"{len(expected - received)} lost; {dropped}") from missing
    finally:
        for publisher in publishers:
            publisher.stop.set()
        for peer in [*devices, observer]:
            peer.stop()
