"""The real upstream peers the uplink tests talk to, checked against real clients.

mosquitto with its own command-line clients and paho-mqtt, the HTTP(S) sink with curl and
httpx, the raw TLS servers with socat and ``openssl s_client``, and the certificate factory
against ``openssl``. A missing program fails the test: these are the peers every uplink test
stands on.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from support.certs import CertFiles, TestCA, Validity, spki_sha256_b64
from support.https_sink import (
    HttpSink,
    SinkResponse,
    TlsEchoServer,
    TlsServer,
    stream_pattern,
)
from support.mosquitto import (
    BrokerTls,
    MosquittoBroker,
    MosquittoNotInstalled,
    find_binary,
    running_mosquitto,
)

TIMEOUT_S = 20.0
ACL = """\
user dev-a
topic readwrite devices/dev-a/#

user dev-b
topic readwrite devices/dev-b/#
topic read devices/dev-a/#
"""


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"`{name}` is not installed; scripts/test installs the peers", pytrace=False)
    return found


def run(argv: Sequence[str | Path], stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [tool(str(argv[0])), *(str(a) for a in argv[1:])],
        input=stdin,
        capture_output=True,
        timeout=TIMEOUT_S,
        check=False,
    )


@dataclass(frozen=True)
class Pki:
    ca: TestCA
    cafile: Path
    server: CertFiles
    dev_a: CertFiles
    dev_b: CertFiles
    directory: Path

    def mqtt_tls_args(self, who: CertFiles) -> list[str]:
        return ["--cafile", str(self.cafile), "--cert", str(who.cert), "--key", str(who.key)]


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = TestCA.create()
    directory = tmp_path / "pki"
    return Pki(
        ca=ca,
        cafile=ca.write_bundle(directory / "ca.pem"),
        server=ca.issue_server(dns_names=("localhost", "broker.test")).write(directory, "server"),
        dev_a=ca.issue_client("dev-a").write(directory, "dev-a"),
        dev_b=ca.issue_client("dev-b", dns_names=("dev-b.devices.test",)).write(directory, "dev-b"),
        directory=directory,
    )


@pytest.fixture
def broker(pki: Pki) -> Iterator[MosquittoBroker]:
    try:
        find_binary("mosquitto")
    except MosquittoNotInstalled as exc:
        pytest.fail(str(exc), pytrace=False)
    with running_mosquitto(BrokerTls(pki.cafile, pki.server), ACL, plain_listener=True) as b:
        yield b


def subscribe(broker: MosquittoBroker, client_id: str, *args: str) -> subprocess.Popen[bytes]:
    """``mosquitto_sub`` for one message, returned once the broker has acknowledged it."""
    mark = broker.log_mark()
    process = subprocess.Popen(
        [tool("mosquitto_sub"), "-h", broker.host, "-i", client_id, "-C", "1", "-v", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        broker.wait_for_log(f"Sending SUBACK to {client_id}", since=mark)
    except BaseException:
        process.kill()
        process.communicate()
        raise
    return process


def mosquitto_pub(broker: MosquittoBroker, *args: str) -> subprocess.CompletedProcess[bytes]:
    """``mosquitto_pub`` to the broker's TLS listener."""
    return run(["mosquitto_pub", "-h", broker.host, "-p", str(broker.port), *args])


# -- mosquitto -----------------------------------------------------------------------------------


def test_mosquitto_delivers_a_publish_to_an_identity_allowed_to_read(
    broker: MosquittoBroker, pki: Pki
) -> None:
    reader = pki.mqtt_tls_args(pki.dev_b)
    sub = subscribe(broker, "sub-b", "-p", str(broker.port), *reader, "-t", "devices/dev-a/#")

    # The username a client sends is ignored: the certificate's CN is the identity.
    writer = [*pki.mqtt_tls_args(pki.dev_a), "-u", "someone-else", "-i", "pub-a", "-q", "1"]
    result = mosquitto_pub(broker, *writer, "-t", "devices/dev-a/t", "-m", "hi")
    assert result.returncode == 0, result.stderr.decode()

    out, err = sub.communicate(timeout=TIMEOUT_S)
    assert sub.returncode == 0, err.decode()
    assert out.decode() == "devices/dev-a/t hi\n"
    assert "as pub-a (p2, c1, k60, u'dev-a')" in broker.wait_for_log("as pub-a")
    assert "u'dev-b'" in broker.wait_for_log("as sub-b")


def test_mosquitto_denies_a_publish_outside_the_acl(broker: MosquittoBroker, pki: Pki) -> None:
    # The observer on the ACL-free plain listener sees everything that is published; its first
    # message must be the allowed one sent after the forbidden one (the positive control).
    observer = subscribe(broker, "observer", "-p", str(broker.plain_port), "-t", "devices/#")
    mark = broker.log_mark()

    writer = [*pki.mqtt_tls_args(pki.dev_a), "-q", "1"]
    for topic, message in [("devices/dev-b/t", "forbidden"), ("devices/dev-a/t", "allowed")]:
        result = mosquitto_pub(broker, *writer, "-t", topic, "-m", message)
        assert result.returncode == 0, result.stderr.decode()  # QoS 1: acknowledged, in order

    out, err = observer.communicate(timeout=TIMEOUT_S)
    assert observer.returncode == 0, err.decode()
    assert out.decode() == "devices/dev-a/t allowed\n"
    denied = broker.wait_for_log("Denied PUBLISH", since=mark)
    assert "'devices/dev-b/t'" in denied
    assert not broker.log_lines("Denied PUBLISH", since=mark)[1:]


def test_mosquitto_refuses_a_client_without_a_certificate(
    broker: MosquittoBroker, pki: Pki
) -> None:
    mark = broker.log_mark()
    result = mosquitto_pub(broker, "--cafile", str(pki.cafile), "-t", "devices/dev-a/t", "-m", "x")
    assert result.returncode != 0
    broker.wait_for_log("peer did not return a certificate", since=mark)


def test_paho_qos2_round_trip_with_a_client_certificate(broker: MosquittoBroker, pki: Pki) -> None:
    connected, subscribed, received = threading.Event(), threading.Event(), threading.Event()
    messages: list[mqtt.MQTTMessage] = []

    def on_connect(*args: object) -> None:
        connected.set()

    def on_subscribe(*args: object) -> None:
        subscribed.set()

    def on_message(client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        messages.append(message)
        received.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="paho-a")
    client.tls_set(
        ca_certs=str(pki.cafile), certfile=str(pki.dev_a.cert), keyfile=str(pki.dev_a.key)
    )
    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        assert connected.wait(TIMEOUT_S)
        client.subscribe("devices/dev-a/#", qos=2)
        assert subscribed.wait(TIMEOUT_S)
        info = client.publish("devices/dev-a/q2", b"\x00exactly once\xff", qos=2)
        info.wait_for_publish(TIMEOUT_S)
        assert info.is_published()
        assert received.wait(TIMEOUT_S)
    finally:
        client.disconnect()
        client.loop_stop()
    [message] = messages
    assert (message.topic, message.payload, message.qos) == (
        "devices/dev-a/q2",
        b"\x00exactly once\xff",
        2,
    )
    assert "u'dev-a'" in broker.wait_for_log("as paho-a")
    broker.wait_for_log("Received PUBCOMP from paho-a")  # the broker's delivery leg, too


# -- the HTTP(S) sink ----------------------------------------------------------------------------


def curl(*args: str | Path) -> subprocess.CompletedProcess[bytes]:
    return run(["curl", "--silent", "--show-error", "--max-time", str(int(TIMEOUT_S)), *args])


def test_https_sink_records_the_client_certificate_curl_presents(pki: Pki) -> None:
    with HttpSink(pki.server, client_cafile=pki.cafile, require_client_cert=True) as sink:
        result = curl(
            "--cacert", pki.cafile, "--cert", pki.dev_b.cert, "--key", pki.dev_b.key,
            "-H", "X-Request-Id: req-7", "--data-binary", "payload",
            f"{sink.url}/ingest?x=1",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr.decode()
        [request] = sink.requests.wait_for(1)
    assert json.loads(result.stdout) == {
        "id": 1,
        "request_id": "req-7",
        "method": "POST",
        "path": "/ingest?x=1",
        "body_bytes": 7,
        "client_cn": "dev-b",
    }
    assert (request.method, request.path, request.body) == ("POST", "/ingest?x=1", b"payload")
    assert request.client_cn == "dev-b"
    assert request.tls is not None
    assert request.tls.client_certificate is not None
    assert request.tls.client_certificate.subject_alt_names == ("DNS:dev-b.devices.test",)
    assert request.tls.version in {"TLSv1.2", "TLSv1.3"}
    assert request.header("x-request-id") == "req-7"
    assert not sink.errors.snapshot()


def test_https_sink_refuses_a_client_without_a_certificate(pki: Pki) -> None:
    with HttpSink(pki.server, client_cafile=pki.cafile, require_client_cert=True) as sink:
        refused = curl("--cacert", pki.cafile, f"{sink.url}/")
        [failure] = sink.handshake_failures.wait_for(1)
        allowed = curl(
            "--cacert", pki.cafile, "--cert", pki.dev_a.cert, "--key", pki.dev_a.key, f"{sink.url}/"
        )  # fmt: skip
        assert allowed.returncode == 0, allowed.stderr.decode()
        assert [r.client_cn for r in sink.requests.snapshot()] == ["dev-a"]
    assert refused.returncode != 0
    assert failure.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE"


def test_plain_sink_answers_a_configured_status_and_streams_a_large_body() -> None:
    with HttpSink(None, response=SinkResponse(status=503, body=b"busy")) as sink:
        assert sink.url.startswith("http://")
        busy = curl("--write-out", "%{http_code}", f"{sink.url}/a")
        assert busy.stdout == b"busy503"

        size = 5 * 1024 * 1024 + 3
        sink.respond_with(SinkResponse(stream_bytes=size))
        streamed = curl(f"{sink.url}/big")
        assert streamed.returncode == 0, streamed.stderr.decode()
        assert streamed.stdout == stream_pattern(size)
        assert [r.tls for r in sink.requests.wait_for(2)] == [None, None]


def test_sink_holds_a_stream_after_its_first_chunk_until_released() -> None:
    gate = threading.Event()
    response = SinkResponse(stream_bytes=1024 * 1024, stream_chunk_bytes=1024, stream_gate=gate)
    with (
        HttpSink(None, response=response) as sink,
        httpx.Client(timeout=TIMEOUT_S) as client,
        client.stream("GET", f"{sink.url}/s") as reply,
    ):
        chunks = reply.iter_bytes()
        first = next(chunks)  # arrives while the rest is held back
        assert not gate.is_set()
        gate.set()
        body = first + b"".join(chunks)
    assert body == stream_pattern(1024 * 1024)


def test_intermediate_chains_verify_under_strict_python_tls(tmp_path: Path) -> None:
    ca = TestCA.create(intermediate=True)
    cafile = ca.write_bundle(tmp_path / "root.pem")
    server = ca.issue_server().write(tmp_path, "server")
    device = ca.issue_client("dev-i").write(tmp_path, "dev-i")
    context = ssl.create_default_context(cafile=cafile)  # VERIFY_X509_STRICT since 3.13
    context.load_cert_chain(device.cert, device.key)
    with (
        HttpSink(server, client_cafile=cafile, require_client_cert=True) as sink,
        httpx.Client(verify=context) as client,
    ):
        assert client.get(f"{sink.url}/").json()["client_cn"] == "dev-i"
    checked = run(
        [
            "openssl",
            "verify",
            "-x509_strict",
            "-CAfile",
            cafile,
            "-untrusted",
            server.cert,
            server.cert,
        ]
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


# -- raw TLS servers -----------------------------------------------------------------------------


def test_tls_echo_server_echoes_and_answers_a_half_close(pki: Pki) -> None:
    with TlsEchoServer(
        pki.server, client_cafile=pki.cafile, require_client_cert=True, after_eof=b"bye\n"
    ) as echo:
        address = (
            f"OPENSSL:127.0.0.1:{echo.port},cafile={pki.cafile},"
            f"cert={pki.dev_a.cert},key={pki.dev_a.key}"
        )
        # socat ends its sending side on stdin's EOF and waits (-t) for ours to end.
        result = run(["socat", "-t", str(int(TIMEOUT_S)), "-", address], stdin=b"ping\n")
        [connection] = echo.connections.wait_for(1)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == b"ping\nbye\n"
    assert (connection.received, connection.eof) == (b"ping\n", "close_notify")
    assert connection.session.client_cn == "dev-a"


def test_tls_echo_server_tells_a_bare_tcp_fin_from_close_notify(pki: Pki) -> None:
    context = ssl.create_default_context(cafile=pki.cafile)
    with (
        TlsEchoServer(pki.server, after_eof=b"bye") as echo,
        socket.create_connection((echo.host, echo.port), timeout=TIMEOUT_S) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(b"ping")
        assert tls.recv(4) == b"ping"
        # Shut the TCP write side under the TLS layer: a FIN with no close_notify.
        with socket.socket(fileno=os.dup(tls.fileno())) as same:
            same.shutdown(socket.SHUT_WR)
        [connection] = echo.connections.wait_for(1)
    assert (connection.received, connection.eof) == (b"ping", "tcp_fin")
    assert connection.session.client_certificate is None


def s_client_verify(server: TlsServer, cafile: Path, *extra: str) -> str:
    result = run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"{server.host}:{server.port}",
            "-CAfile",
            cafile,
            *extra,
        ]
    )
    lines = [ln for ln in result.stdout.decode().splitlines() if "Verify return code" in ln]
    assert lines, result.stdout.decode() + result.stderr.decode()
    return lines[-1].strip()


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("valid", "Verify return code: 0 (ok)"),
        ("expired", "Verify return code: 10 (certificate has expired)"),
        ("not_yet_valid", "Verify return code: 9 (certificate is not yet valid)"),
        # 20 at depth 0, then s_client sums up with 21
        ("unknown_ca", "Verify return code: 21 (unable to verify the first certificate)"),
        ("wrong_host", "Verify return code: 62 (hostname mismatch)"),
    ],
)
def test_openssl_sees_what_the_tls_server_presents(pki: Pki, case: str, expected: str) -> None:
    now = pki.ca.now
    match case:
        case "expired":
            issued = pki.ca.issue_server(validity=Validity.expired(now))
        case "not_yet_valid":
            issued = pki.ca.issue_server(validity=Validity.not_yet_valid(now))
        case "unknown_ca":
            issued = TestCA.create("stranger", now=now).issue_server()
        case "wrong_host":
            issued = pki.ca.issue_server(dns_names=("other.test",), ip_addresses=())
        case _:
            issued = pki.ca.issue_server()
    with TlsServer(issued.write(pki.directory, case)) as server:
        assert s_client_verify(server, pki.cafile, "-verify_hostname", "localhost") == expected


def test_tls_server_records_the_alert_a_verifying_client_sends(pki: Pki) -> None:
    expired = pki.ca.issue_server(validity=Validity.expired(pki.ca.now))
    with TlsServer(expired.write(pki.directory, "expired")) as server:
        s_client_verify(server, pki.cafile, "-verify_return_error")
        [failure] = server.handshake_failures.wait_for(1)
        assert not server.sessions.snapshot()
    assert failure.reason == "SSLV3_ALERT_CERTIFICATE_EXPIRED"


# -- the certificate factory ---------------------------------------------------------------------


def test_spki_pin_matches_openssl(pki: Pki) -> None:
    issued = pki.ca.issue_client("pinned")
    files = issued.write(pki.directory, "pinned")
    public = run(["openssl", "x509", "-in", files.cert, "-noout", "-pubkey"])
    der = run(["openssl", "pkey", "-pubin", "-outform", "DER"], stdin=public.stdout)
    digest = run(["openssl", "dgst", "-sha256", "-binary"], stdin=der.stdout)
    assert spki_sha256_b64(issued.certificate) == base64.b64encode(digest.stdout).decode()
