"""An mtls listener that also trusts an outside CA (``POST /v1/ca/trust``): devices with that
CA's certificates are let in by name; its expired certificates are refused at the handshake;
fleetgate's own revoked certificates are still refused, just after the handshake (OpenSSL can
only check CRLs when every trusted CA has one, and the outside CA's CRL is not fleetgate's).

Behind the listener is a plain echo server (``forward_to``); the devices are ``openssl
s_client`` and Python's ``ssl``.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import socketserver
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from e2e.conftest import ADMIN, _Echo
from e2e.gateway import Gateway, free_port
from e2e.pki_support import (
    add_device,
    fetch,
    issue_csr,
    make_csr,
    openssl,
    revoke,
    running_gateway,
    write_pem,
)
from support.certs import CertFiles, TestCA, Validity
from support.mqtt_peer import HOST, TIMEOUT_S


@dataclass
class Site:
    gateway: Gateway
    port: int
    by_address_port: int  # mtls too, but the device is its source address
    root: Path  # fleetgate's root: what devices trust the listener by
    outside: TestCA
    workdir: Path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    workdir = tmp_path_factory.mktemp("outside-ca")
    echo = socketserver.ThreadingTCPServer((HOST, 0), _Echo)
    echo.daemon_threads = True
    threading.Thread(target=echo.serve_forever, daemon=True).start()
    outside = TestCA.create("outside device CA")
    try:
        with running_gateway(workdir / "data", FLEETGATE_ADMIN_TOKEN=ADMIN) as gateway:
            root = fetch(gateway, "/pki/root.pem", workdir / "root.pem")
            with gateway.client(ADMIN) as api:
                pem = outside.root.certificate.public_bytes(Encoding.PEM).decode()
                trusted = api.post("/v1/ca/trust", json={"certificate_pem": pem, "name": "oem"})
                assert trusted.status_code == 201, trusted.text
            port, by_address_port = free_port(), free_port()
            text = (
                f'\n[listeners.m]\nprotocol = "tcp"\nbind = "{HOST}:{port}"\n'
                f'forward_to = "{HOST}:{echo.server_address[1]}"\nidentity = "certificate"\n'
                f'\n[listeners.m.tls]\nmode = "mtls"\nserver_names = {json.dumps([HOST])}\n'
                f'\n[listeners.ma]\nprotocol = "tcp"\nbind = "{HOST}:{by_address_port}"\n'
                f'forward_to = "{HOST}:{echo.server_address[1]}"\nidentity = "source_address"\n'
                f'\n[listeners.ma.tls]\nmode = "mtls"\nserver_names = {json.dumps([HOST])}\n'
            )
            mark = gateway.mark()
            with gateway.data_dir.joinpath("fleetgate.toml").open("a") as out:
                out.write(text)
            gateway.signal(signal.SIGHUP)
            gateway.wait_for("config.reloaded", since=mark)
            yield Site(gateway, port, by_address_port, root, outside, workdir)
    finally:
        echo.shutdown()
        echo.server_close()


def echo_through(site: Site, files: CertFiles) -> bytes:
    context = ssl.create_default_context(cafile=site.root)
    context.load_cert_chain(files.cert, files.key)
    with (
        socket.create_connection((HOST, site.port), timeout=TIMEOUT_S) as raw,
        context.wrap_socket(raw, server_hostname=HOST) as tls,
    ):
        tls.sendall(b"ping")
        return tls.recv(4)


def answered(site: Site, files: CertFiles) -> bytes:
    """The echo's reply; nothing when the gateway closed the connection instead."""
    try:
        return echo_through(site, files)
    except (ssl.SSLError, ConnectionError):
        return b""


def refused_reason(site: Site, mark: int) -> str:
    event = site.gateway.wait_for("listener.refused", since=mark, timeout_s=TIMEOUT_S)
    return str(event["reason"])


def test_a_device_of_a_trusted_outside_ca_is_let_in_by_its_name(site: Site) -> None:
    with site.gateway.client(ADMIN) as api:
        add_device(api, "oem-1")
    files = site.outside.issue_client("oem-1").write(site.workdir, "oem-1")
    mark = site.gateway.mark()
    assert echo_through(site, files) == b"ping"
    connected = site.gateway.wait_for("listener.connected", since=mark)
    assert connected["device"] == "oem-1"


def test_an_expired_outside_certificate_is_refused_at_the_handshake(site: Site) -> None:
    with site.gateway.client(ADMIN) as api:
        add_device(api, "oem-expired")
    issued = site.outside.issue_client("oem-expired", validity=Validity.expired(site.outside.now))
    files = issued.write(site.workdir, "oem-expired")
    mark = site.gateway.mark()
    shown = openssl(
        "s_client", "-connect", f"{HOST}:{site.port}", "-CAfile", site.root,
        "-cert", files.cert, "-key", files.key, "-ign_eof", check=False,
    )  # fmt: skip
    assert "certificate expired" in (shown.stdout + shown.stderr).lower(), shown
    assert refused_reason(site, mark) == "certificate_expired"


def test_a_registered_name_without_a_device_is_unknown_device(site: Site) -> None:
    files = site.outside.issue_client("nobody-registered").write(site.workdir, "nobody")
    mark = site.gateway.mark()
    assert answered(site, files) == b""
    assert refused_reason(site, mark) == "unknown_device"


def test_revoked_fleetgate_certificates_are_still_refused(site: Site) -> None:
    with site.gateway.client(ADMIN) as api:
        add_device(api, "own-revoked")
        key, csr = make_csr(site.workdir, "own-revoked", "/CN=own-revoked")
        issued = issue_csr(api, "own-revoked", csr)
        revoke(api, issued["certificate"]["serial"])
    cert = write_pem(
        site.workdir / "own-revoked.crt", issued["certificate_pem"] + issued["chain_pem"]
    )
    mark = site.gateway.mark()
    assert answered(site, CertFiles(cert, key)) == b""
    assert refused_reason(site, mark) == "certificate_revoked"


def _own_certificate(site: Site, device_id: str, address: str) -> tuple[CertFiles, str]:
    """A device registered at ``address`` with a certificate fleetgate issued; its serial."""
    with site.gateway.client(ADMIN) as api:
        add_device(api, device_id, addresses=[address])
        key, csr = make_csr(site.workdir, device_id, f"/CN={device_id}")
        issued = issue_csr(api, device_id, csr)
    cert = write_pem(
        site.workdir / f"{device_id}.crt", issued["certificate_pem"] + issued["chain_pem"]
    )
    return CertFiles(cert, key), issued["certificate"]["serial"]


def _connect(site: Site, files: CertFiles, source: str) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=site.root)
    context.load_cert_chain(files.cert, files.key)
    raw = socket.create_connection(
        (HOST, site.by_address_port), timeout=TIMEOUT_S, source_address=(source, 0)
    )
    return context.wrap_socket(raw, server_hostname=HOST)


def test_a_revoked_certificate_is_refused_where_the_address_names_the_device(
    site: Site,
) -> None:
    """The handshake's CRL check is off (an outside CA is trusted), and the device is found by
    its address, not its certificate: the revocation is checked all the same."""
    files, serial = _own_certificate(site, "by-address-revoked", "127.0.4.1")
    with site.gateway.client(ADMIN) as api:
        revoke(api, serial)
    mark = site.gateway.mark()
    try:
        with _connect(site, files, "127.0.4.1") as tls:
            tls.sendall(b"ping")
            assert tls.recv(4) == b""
    except (ssl.SSLError, ConnectionError):
        pass
    refused = site.gateway.wait_for("listener.refused", since=mark, timeout_s=TIMEOUT_S)
    assert (refused["listener"], refused["reason"]) == ("ma", "certificate_revoked"), refused


def test_revoking_cuts_a_connection_its_certificate_opened_where_the_address_names_the_device(
    site: Site,
) -> None:
    files, serial = _own_certificate(site, "by-address-live", "127.0.4.2")
    with _connect(site, files, "127.0.4.2") as tls:
        tls.sendall(b"ping")
        assert tls.recv(4) == b"ping"
        mark = site.gateway.mark()
        with site.gateway.client(ADMIN) as api:
            revoke(api, serial)
        cut = site.gateway.wait_for("listener.connection_cut", since=mark, timeout_s=TIMEOUT_S)
        assert (cut["listener"], cut["device"], cut["reason"]) == (
            "ma",
            "by-address-live",
            "certificate_revoked",
        )
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            assert tls.recv(4) == b""  # closed, or reset
    with site.gateway.client(ADMIN) as api:
        audit = api.get(
            "/v1/audit", params={"action": "connection.cut", "target_id": "by-address-live"}
        ).json()["items"]
    assert [entry["after"]["reason"] for entry in audit] == ["certificate_revoked"]
