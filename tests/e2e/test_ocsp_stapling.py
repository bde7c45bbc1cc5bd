"""OCSP stapling: a tls listener whose certificate fleetgate's CA issued sends fleetgate's OCSP
answer about it to clients that ask (``openssl s_client -status``), says "revoked" once it is,
sends nothing for another CA's certificate, and never sends an answer past its nextUpdate.
"""

from __future__ import annotations

import re
import socket
import ssl
import subprocess
import threading
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp

from e2e.conftest import ADMIN
from e2e.gateway import GatewayFactory, free_port
from e2e.pki_support import fetch, revoke, served_certificate, tls_listener_env
from fleetgate.dataplane import native
from support.certs import TestCA, write_cert_files
from support.mqtt_peer import HOST, TIMEOUT_S


def s_client_status(port: int, cafile: Path) -> str:
    """What ``openssl s_client -status`` prints about a handshake with the listener."""
    done = subprocess.run(
        ["openssl", "s_client", "-connect", f"{HOST}:{port}", "-status", "-CAfile", str(cafile)],
        input="",
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert "Verify return code: 0 (ok)" in done.stdout, done.stdout + done.stderr
    return done.stdout


def test_a_listener_staples_fleetgates_answer_and_then_the_revocation(
    gateway_factory: GatewayFactory, echo_server: int, tmp_path: Path
) -> None:
    port = free_port()
    gateway = gateway_factory(
        FLEETGATE_ADMIN_TOKEN=ADMIN,
        **tls_listener_env("edge", port, echo_server),
    ).start()
    stapled = gateway.wait_for("listener.ocsp_stapled", lambda e: e["listener"] == "edge")
    assert stapled["status"] == "good"
    root = fetch(gateway, "/pki/root.pem", tmp_path / "root.pem")
    serial = format(served_certificate(port, cafile=root).serial_number, "x")

    printed = s_client_status(port, root)
    assert "OCSP Response Status: successful" in printed, printed
    assert "Cert Status: good" in printed, printed
    answered = re.search(r"Serial Number: ([0-9A-F]+)", printed)
    assert answered is not None, printed
    assert answered.group(1).lower().lstrip("0") == serial

    mark = gateway.mark()
    with gateway.client(ADMIN) as api:
        revoke(api, serial, "superseded")
    gateway.wait_for(
        "listener.ocsp_stapled",
        lambda e: e["listener"] == "edge" and e["status"] == "revoked",
        since=mark,
    )
    printed = s_client_status(port, root)
    assert "Cert Status: revoked" in printed, printed
    assert "Revocation Reason: superseded" in printed, printed


def test_another_cas_certificate_is_served_without_a_staple(
    gateway_factory: GatewayFactory, echo_server: int, tmp_path: Path
) -> None:
    outside = TestCA.create("outside server CA")
    issued = outside.issue_server()
    files = write_cert_files(tmp_path, "server", issued.chain(), issued.private_key)
    port = free_port()
    gateway = gateway_factory(
        FLEETGATE_ADMIN_TOKEN=ADMIN,
        **tls_listener_env(
            "files", port, echo_server, cert_file=str(files.cert), key_file=str(files.key)
        ),
    ).start()
    gateway.wait_for("listener.bound", lambda e: e["listener"] == "files")
    printed = s_client_status(port, outside.write_bundle(tmp_path / "outside.pem"))
    assert "OCSP response: no response sent" in printed, printed
    assert not [e for e in gateway.events if e.get("event") == "listener.ocsp_stapled"]


def test_a_staple_past_its_usable_time_is_not_sent(tmp_path: Path) -> None:
    """The staple callback itself, under a Python TLS server and openssl s_client, with a
    clock the test moves."""
    assert native.AVAILABLE, native.WHY_NOT
    ca = TestCA.create("staple test CA")
    issued = ca.issue_server()
    files = write_cert_files(tmp_path, "server", issued.chain(), issued.private_key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(files.cert, files.key)
    answer = ocsp.OCSPResponseBuilder.build_unsuccessful(ocsp.OCSPResponseStatus.TRY_LATER)
    now = [100.0]
    native.staple(context, native.Staple(answer.public_bytes(Encoding.DER), 200.0, lambda: now[0]))

    with socket.create_server((HOST, 0)) as server:
        port = server.getsockname()[1]

        def serve(count: int) -> None:
            for _ in range(count):
                conn, _ = server.accept()
                try:
                    with context.wrap_socket(conn, server_side=True):
                        pass
                except (ssl.SSLError, OSError):
                    pass

        thread = threading.Thread(target=serve, args=(2,), daemon=True)
        thread.start()
        cafile = ca.write_bundle(tmp_path / "ca.pem")
        printed = s_client_status(port, cafile)
        assert "OCSP Response Status: trylater" in printed, printed
        now[0] = 200.0  # the answer's time is up
        printed = s_client_status(port, cafile)
        assert "OCSP response: no response sent" in printed, printed
        thread.join(TIMEOUT_S)
