"""A tls listener's server certificate changes while the gateway runs: new handshakes get the
new one, connections already open keep relaying, and a broken replacement changes nothing.

Two ways the certificate changes:

- fleetgate's CA issued it (the credential ``listener-<name>``) and fleetgate renews it: the
  ``certificate.renew`` on the change feed makes the listener build a new server context. No
  API or CLI renews on demand, so the gateway runs with a renewal point a few seconds after
  issuance (``pki.renew_at_fraction``) and a one-second maintenance pass.
- the listener reads ``cert_file``/``key_file``, replaced on disk by another tool: the file
  watch (every ``FILE_CHECK_S``) reads them again. The replacements are certificates fleetgate
  issued and exported (``POST /v1/certificates``, then ``/export``), as an operator would.

Clients are Python's ssl module trusting fleetgate's root (``/pki/root.pem``), which verifies
the served chain and the listener's IP address at every handshake.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from e2e.conftest import ADMIN
from e2e.gateway import Gateway, GatewayFactory, free_port
from e2e.pki_support import add_device, fetch, served_certificate, tls_listener_env
from fleetgate.dataplane.listeners import FILE_CHECK_S
from fleetgate.pki.authority import BACKDATE
from support.mqtt_peer import HOST, TIMEOUT_S

POLL_S = 0.1  # between two probing handshakes
DEVICE_SOURCE = "127.0.5.1"  # the relaying device's address (the probes come from HOST)

# The issued listener certificate lives a day (plus the minute fleetgate backdates notBefore)
# and is renewed RENEW_AFTER_S after it was issued, and so is each renewed one: the test waits
# for the renewal of the certificate it saw, then has RENEW_AFTER_S to see its successor.
SERVER_LIFETIME = timedelta(days=1)
RENEW_AFTER_S = 6.0
RENEW_AT_FRACTION = (BACKDATE.total_seconds() + RENEW_AFTER_S) / (
    SERVER_LIFETIME + BACKDATE
).total_seconds()


def _client_context(cafile: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=cafile)  # CERT_REQUIRED, names checked


def served_until(
    port: int, cafile: Path, serials: Callable[[], set[int]], timeout_s: float
) -> x509.Certificate:
    """Handshake until one is served a certificate in ``serials()``; fail at the deadline."""
    deadline = time.monotonic() + timeout_s
    seen: list[str] = []
    while True:
        certificate = served_certificate(port, cafile=cafile)
        wanted = serials()
        if certificate.serial_number in wanted:
            return certificate
        if not seen or seen[-1] != f"{certificate.serial_number:x}":
            seen.append(f"{certificate.serial_number:x}")
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"no handshake served {sorted(wanted)} within {timeout_s}s; served: {seen}"
            )
        time.sleep(POLL_S)


@contextmanager
def _device_connection(port: int, root: Path) -> Iterator[ssl.SSLSocket]:
    """A verified TLS connection from the relaying device's address."""
    raw = socket.create_connection(
        (HOST, port), timeout=TIMEOUT_S, source_address=(DEVICE_SOURCE, 0)
    )
    with _client_context(root).wrap_socket(raw, server_hostname=HOST) as tls:
        yield tls


def echo(tls: ssl.SSLSocket, payload: bytes) -> bytes:
    """Send ``payload`` through a relaying connection and read as many bytes back."""
    tls.sendall(payload)
    received = bytearray()
    while len(received) < len(payload):
        chunk = tls.recv(len(payload) - len(received))
        if not chunk:
            break
        received += chunk
    return bytes(received)


def public_key_der(certificate: x509.Certificate) -> bytes:
    return certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def sans(certificate: x509.Certificate) -> x509.SubjectAlternativeName:
    return certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


# -- 1. a certificate fleetgate issued, renewed by fleetgate ---------------------------------


def test_a_renewed_listener_certificate_is_served_and_open_connections_keep_relaying(
    gateway_factory: GatewayFactory, echo_server: int, tmp_path: Path
) -> None:
    port = free_port()
    gateway = gateway_factory(
        FLEETGATE_ADMIN_TOKEN=ADMIN,
        FLEETGATE_PKI__SERVER_LIFETIME_DAYS=str(SERVER_LIFETIME.days),
        FLEETGATE_PKI__RENEW_AT_FRACTION=repr(RENEW_AT_FRACTION),
        FLEETGATE_PKI__MAINTENANCE_INTERVAL_S="1",
        **tls_listener_env("edge", port, echo_server),
    ).start()
    gateway.wait_for("listener.bound", lambda e: e["listener"] == "edge")
    root = fetch(gateway, "/pki/root.pem", tmp_path / "root.pem")
    with gateway.client(ADMIN) as api:
        add_device(api, "edge-meter", addresses=[DEVICE_SOURCE])

    with _device_connection(port, root) as live:
        der = live.getpeercert(binary_form=True)
        assert der is not None
        before = x509.load_der_x509_certificate(der)  # verified against the root
        assert echo(live, b"before the renewal") == b"before the renewal"

        # fleetgate renews the certificate this connection was served (it may have renewed an
        # earlier one already: the search starts at the beginning of the log).
        renewed = gateway.wait_for(
            "pki.certificate_renewed",
            lambda e: e["serial"] == f"{before.serial_number:x}",
            timeout_s=RENEW_AFTER_S + TIMEOUT_S,
        )
        assert renewed["credential"] == "listener-edge", renewed
        successor = int(renewed["successor"], 16)

        after = served_until(
            port, root, lambda: _serials_from(gateway, successor), timeout_s=TIMEOUT_S
        )
        # A renewal: the same key and names, a new serial and a later validity.
        assert public_key_der(after) == public_key_der(before)
        assert sans(after) == sans(before)
        assert after.subject == before.subject
        assert after.issuer == before.issuer
        assert after.not_valid_before_utc > before.not_valid_before_utc
        assert after.not_valid_after_utc > before.not_valid_after_utc
        gateway.wait_for(  # the change feed's certificate.renew rebuilt the server context
            "listener.tls_reloaded",
            lambda e: e["listener"] == "edge" and e["why"] == "certificate.renew",
        )

        # The connection opened before the renewal relays as before, and was never cut.
        assert echo(live, b"after the renewal") == b"after the renewal"
        assert not [e for e in gateway.events if e.get("event") == "listener.connection_cut"]

    # A device connecting now is served the renewed certificate and relays too.
    with _device_connection(port, root) as fresh:
        der = fresh.getpeercert(binary_form=True)
        assert der is not None
        assert x509.load_der_x509_certificate(der).serial_number in _serials_from(
            gateway, successor
        )
        assert echo(fresh, b"new connection") == b"new connection"


def _serials_from(gateway: Gateway, serial: int) -> set[int]:
    """``serial`` and every renewal after it (the test may be slower than RENEW_AFTER_S)."""
    found = {serial}
    for event in list(gateway.events):
        if event.get("event") == "pki.certificate_renewed" and int(event["serial"], 16) in found:
            found.add(int(event["successor"], 16))
    return found


# -- 2. a certificate read from files, replaced by another tool --------------------------------


def issue_server_files(api: httpx.Client, name: str) -> tuple[bytes, bytes]:
    """(chain PEM, key PEM) of a server certificate fleetgate issued and exported once."""
    issued = api.post(
        "/v1/certificates",
        json={
            "credential_id": f"file-{name}",
            "profile": "gateway_server",
            "common_name": HOST,
            "ip_addresses": [HOST],
        },
    )
    assert issued.status_code == 201, issued.text
    body = issued.json()
    exported = api.post(f"/v1/credentials/file-{name}/export", json={"format": "pem"})
    assert exported.status_code == 200, exported.text
    key = re.search(
        r"-----BEGIN [A-Z ]*PRIVATE KEY-----.+?-----END [A-Z ]*PRIVATE KEY-----\n",
        exported.text,
        re.DOTALL,
    )
    assert key is not None, "the export holds no private key"
    return (body["certificate_pem"] + body["chain_pem"]).encode(), key.group().encode()


def replace_file(target: Path, data: bytes) -> None:
    """Write ``target`` whole: a reader sees the old file or the new one, never a mix."""
    staging = target.with_name(target.name + ".new")
    staging.write_bytes(data)
    os.replace(staging, target)


def serial_in(chain_pem: bytes) -> int:
    return x509.load_pem_x509_certificate(chain_pem).serial_number


def test_replaced_certificate_files_are_served_and_a_broken_one_keeps_the_last_good(
    gateway: Gateway, echo_server: int, tmp_path: Path
) -> None:
    cert_file, key_file = tmp_path / "listener.crt", tmp_path / "listener.key"
    root = fetch(gateway, "/pki/root.pem", tmp_path / "root.pem")
    with gateway.client(ADMIN) as api:
        first, renewed, repaired = [
            issue_server_files(api, name) for name in ("first", "renewed", "repaired")
        ]
    replace_file(key_file, first[1])
    replace_file(cert_file, first[0])

    port = free_port()
    mark = gateway.mark()
    with gateway.data_dir.joinpath("fleetgate.toml").open("a") as out:
        out.write(
            f"\n[listeners.files]\nbind = {json.dumps(f'{HOST}:{port}')}\n"
            f"forward_to = {json.dumps(f'{HOST}:{echo_server}')}\n"
            f'\n[listeners.files.tls]\nmode = "tls"\ncert_file = {json.dumps(str(cert_file))}\n'
            f"key_file = {json.dumps(str(key_file))}\n"
        )
    gateway.signal(signal.SIGHUP)
    gateway.wait_for("listener.bound", lambda e: e["listener"] == "files", since=mark)
    assert served_certificate(port, cafile=root).serial_number == serial_in(first[0])

    # Another tool renews the files (the key first, then the certificate): no signal needed.
    mark = gateway.mark()
    replace_file(key_file, renewed[1])
    replace_file(cert_file, renewed[0])
    served_until(
        port, root, lambda: {serial_in(renewed[0])}, timeout_s=5 * FILE_CHECK_S + TIMEOUT_S
    )
    gateway.wait_for(
        "listener.tls_reloaded",
        lambda e: e["listener"] == "files" and e["why"] == "file changed",
        since=mark,
    )

    # Garbage in place of the certificate: the renewed one keeps being served, the log says why.
    mark = gateway.mark()
    replace_file(cert_file, b"-----BEGIN CERTIFICATE-----\nnot a certificate\n")
    failed = gateway.wait_for(
        "listener.tls_reload_failed",
        lambda e: e["listener"] == "files",
        since=mark,
        timeout_s=5 * FILE_CHECK_S + TIMEOUT_S,
    )
    assert failed["why"] == "file changed", failed
    assert failed["detail"] == f"listener files: cert_file {cert_file} holds no PEM certificate"
    for _ in range(3):
        assert served_certificate(port, cafile=root).serial_number == serial_in(renewed[0])

    # The watch goes on after a failure: good files are picked up again.
    replace_file(key_file, repaired[1])
    replace_file(cert_file, repaired[0])
    served_until(
        port, root, lambda: {serial_in(repaired[0])}, timeout_s=5 * FILE_CHECK_S + TIMEOUT_S
    )
