"""udp listeners end to end: each datagram from a registered device becomes a signed HTTPS POST
to the destination's ``udp_path``, presenting the device's own certificate, and a 2xx answer
with a body comes back to the device as one datagram.

One gateway and one destination serve the module. The destination is an
:class:`~support.https_sink.HttpSink` requiring a client certificate from fleetgate's CA; it
answers ``ack <payload>`` unless the payload asks otherwise. Devices are the real ``socat`` and
Python sockets, each on its own loopback source address.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from e2e.conftest import ADMIN
from e2e.gateway import Gateway, free_port
from e2e.pki_support import fetch, issue_generated, running_gateway
from fleetgate.dataplane import signing
from support.certs import TestCA
from support.https_sink import HttpSink, RecordedRequest, SinkResponse

TIMEOUT_S = 20.0
SIGNING_KEY = b"udp-ingest-signing-key-0123456789abcdef-xyz"
KEY_ID = "udp-ingest-1"
UDP_PATH = "/ingest/udp?v=1"
IMSI = "440109876543210"
STRANGER = "127.0.0.250"  # a source address no device is registered with


def answer(request: RecordedRequest) -> SinkResponse:
    """``ack <payload>``; payloads starting ``fail`` get a 500, ``quiet`` an empty 200."""
    payload = base64.b64decode(json.loads(request.body)["payload"])
    if payload.startswith(b"fail"):
        return SinkResponse(status=500, body=b"not for you")
    if payload.startswith(b"quiet"):
        return SinkResponse(body=b"")
    return SinkResponse(body=b"ack " + payload, content_type="application/octet-stream")


@dataclass
class UdpUplink:
    gateway: Gateway
    sink: HttpSink
    port: int  # the "udp" listener, going to the sink
    down_port: int  # the "udp-down" listener, going where nothing listens
    next_source: Iterator[int] = field(default_factory=lambda: iter(range(10, 240)))

    def device(self, device_id: str, **fields: Any) -> str:
        """A device with its own source address and a certificate fleetgate keeps the key of."""
        address = f"127.0.0.{next(self.next_source)}"
        with self.gateway.client(ADMIN) as api:
            body = {"id": device_id, "addresses": [address], **fields}
            created = api.post("/v1/devices", json=body)
            assert created.status_code == 201, created.text
            issue_generated(api, device_id, "ec-p256")
        return address

    def metrics(self) -> str:
        with self.gateway.client(None) as api:
            return api.get("/metrics").text


def _listener(name: str) -> Callable[[dict[str, Any]], bool]:
    return lambda event: event.get("listener") == name


@pytest.fixture(scope="module")
def uplink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UdpUplink]:
    directory = tmp_path_factory.mktemp("uplink-udp")
    with running_gateway(directory / "data", FLEETGATE_ADMIN_TOKEN=ADMIN) as gateway:
        with gateway.client(ADMIN) as api:
            key = {
                "id": "udp-hmac",
                "kind": "hmac",
                "public": {"key_id": KEY_ID},
                "secret": SIGNING_KEY.decode(),
            }
            assert api.post("/v1/credentials", json=key).status_code == 201
        fleet_ca = fetch(gateway, "/pki/ca.pem", directory / "fleet-ca.pem")
        test_ca = TestCA.create("udp destinations root")
        cafile = test_ca.write_bundle(directory / "destinations-ca.pem")
        server = test_ca.issue_server().write(directory, "sink")
        with HttpSink(server, client_cafile=fleet_ca, require_client_cert=True) as sink:
            sink.respond_with(answer)
            port, down_port = free_port(), free_port()
            common = (
                f'server_name = "localhost"\nca_file = {json.dumps(str(cafile))}\n'
                'credential = "device-#{device_id}"\nsigning_credential = "udp-hmac"\n'
                f"udp_path = {json.dumps(UDP_PATH)}\n"
            )
            config = (gateway.data_dir / "fleetgate.toml").read_text() + (
                f'\n[destinations.ingest]\naddress = "127.0.0.1:{sink.port}"\n{common}'
                'identity_headers = ["imsi"]\n'
                f'\n[destinations.down]\naddress = "127.0.0.1:{free_port()}"\n{common}'
                f'\n[listeners.udp]\nprotocol = "udp"\nbind = "127.0.0.1:{port}"\n'
                'destination = "ingest"\n'
                f'\n[listeners.udp-down]\nprotocol = "udp"\nbind = "127.0.0.1:{down_port}"\n'
                'destination = "down"\n'
            )
            (gateway.data_dir / "fleetgate.toml").write_text(config)
            mark = gateway.mark()
            gateway.signal(signal.SIGHUP)
            gateway.wait_for("config.reloaded", since=mark, timeout_s=TIMEOUT_S)
            gateway.wait_for("listener.bound", _listener("udp"), since=mark)
            gateway.wait_for("listener.bound", _listener("udp-down"), since=mark)
            yield UdpUplink(gateway, sink, port, down_port)


def device_socket(source: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((source, 0))
    sock.settimeout(TIMEOUT_S)
    return sock


def nothing_waiting(sock: socket.socket) -> bool:
    """No datagram is queued for ``sock`` (loopback delivers during the sender's sendto)."""
    sock.setblocking(False)
    try:
        sock.recv(65536)
    except BlockingIOError:
        return True
    finally:
        sock.settimeout(TIMEOUT_S)
    return False


def lowercase_headers(record: RecordedRequest) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in record.headers:
        assert name.lower() not in headers, f"{name} sent twice: {record.headers}"
        headers[name.lower()] = value
    return headers


def signed_correctly(record: RecordedRequest) -> bool:
    """fleetgate's own verifier and the receiver docs/uplink.md describes, both."""
    headers = lowercase_headers(record)
    verified = signing.verify(
        SIGNING_KEY,
        method=record.method,
        target=record.path,
        body=record.body,
        headers=headers,
        now=int(time.time()),
    )
    digest = hashlib.sha256(record.body).hexdigest()
    text = "\n".join(
        [
            "v1",
            headers["x-fleetgate-timestamp"],
            headers["x-fleetgate-nonce"],
            record.method,
            record.path,
            digest,
            headers["x-fleetgate-device"],
        ]
    )
    mac = hmac.new(SIGNING_KEY, text.encode(), hashlib.sha256).hexdigest()
    by_hand = digest == headers["x-fleetgate-content-sha256"] and hmac.compare_digest(
        f"v1={mac}", headers["x-fleetgate-signature"]
    )
    assert verified == by_hand, (verified, by_hand)
    return verified


def posted(record: RecordedRequest) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(record.body)
    return body


def new_requests(sink: HttpSink, before: int, count: int) -> list[RecordedRequest]:
    return sink.requests.wait_for(before + count, timeout_s=TIMEOUT_S)[before:]


# -- datagrams in, answers out --------------------------------------------------------------------


def test_a_datagram_becomes_a_signed_post_and_the_answer_comes_back(uplink: UdpUplink) -> None:
    gw, sink = uplink.gateway, uplink.sink
    source = uplink.device("buoy-1", attributes={"imsi": IMSI})
    before = len(sink.requests)
    mark = gw.mark()
    payload = bytes(range(256)) + b"\x00\nend"  # any bytes, not just text
    with device_socket(source) as sock:
        sock.sendto(payload, ("127.0.0.1", uplink.port))
        answer_1, sender = sock.recvfrom(65536)
        # A second datagram, after the first was answered, rides the pooled connection.
        sock.sendto(b"second", ("127.0.0.1", uplink.port))
        answer_2, _ = sock.recvfrom(65536)
        device_address = sock.getsockname()
    first, second = new_requests(sink, before, 2)

    assert answer_1 == b"ack " + payload
    assert answer_2 == b"ack second"
    assert sender == ("127.0.0.1", uplink.port)  # from the listener's own address

    assert (first.method, first.path) == ("POST", UDP_PATH)
    assert first.client_cn == "buoy-1"
    body = posted(first)
    assert body["device_id"] == "buoy-1"
    assert body["group"] == "default"
    assert body["source"] == f"{device_address[0]}:{device_address[1]}"
    assert base64.b64decode(body["payload"], validate=True) == payload
    received_at = datetime.fromisoformat(body["received_at"])
    assert abs(received_at - datetime.now(UTC)) < timedelta(minutes=1)
    headers = lowercase_headers(first)
    assert headers["content-type"] == "application/json"
    assert headers["host"] == "localhost"
    assert headers["x-fleetgate-device"] == "buoy-1"
    assert headers["x-fleetgate-attr-imsi"] == IMSI
    assert headers["x-forwarded-for"] == source
    assert headers["x-fleetgate-key-id"] == KEY_ID
    assert signed_correctly(first)
    assert signed_correctly(second)
    assert base64.b64decode(posted(second)["payload"]) == b"second"
    assert first.peer == second.peer  # one upstream connection for both

    forwarded = gw.wait_for("udp.forwarded", lambda e: e["device"] == "buoy-1", since=mark)
    assert (forwarded["listener"], forwarded["status"]) == ("udp", 200)
    assert forwarded["answer_bytes"] == len(answer_1)


def test_socat_sends_a_datagram_that_reaches_the_destination(uplink: UdpUplink) -> None:
    binary = shutil.which("socat")
    if binary is None:
        pytest.fail("`socat` is not installed; scripts/test installs the peers", pytrace=False)
    sink = uplink.sink
    source = uplink.device("buoy-socat")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((source, 0))  # a free source port for socat to use
        source_port = probe.getsockname()[1]
    before = len(sink.requests)
    payload = b"temp=21.5;\xff\xfe binary tail\n"
    sent = subprocess.run(
        [
            binary,
            "-u",
            "STDIN",
            f"UDP:127.0.0.1:{uplink.port},bind={source}:{source_port}",
        ],
        input=payload,
        capture_output=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert sent.returncode == 0, sent.stderr.decode()
    [record] = new_requests(sink, before, 1)
    assert record.client_cn == "buoy-socat"
    body = posted(record)
    assert body["device_id"] == "buoy-socat"
    assert body["source"] == f"{source}:{source_port}"
    assert base64.b64decode(body["payload"]) == payload
    assert signed_correctly(record)


def test_no_datagram_comes_back_for_an_error_or_an_empty_answer(uplink: UdpUplink) -> None:
    gw, sink = uplink.gateway, uplink.sink
    source = uplink.device("buoy-quiet")
    with device_socket(source) as sock:
        for payload, status in ((b"fail please", 500), (b"quiet please", 200)):
            before = len(sink.requests)
            mark = gw.mark()
            sock.sendto(payload, ("127.0.0.1", uplink.port))
            # (The earlier tests' devices may log their last forward after the mark.)
            forwarded = gw.wait_for(
                "udp.forwarded", lambda e: e["device"] == "buoy-quiet", since=mark
            )
            [record] = new_requests(sink, before, 1)
            assert base64.b64decode(posted(record)["payload"]) == payload
            assert forwarded["status"] == status
            # The answer (if any) is sent right after this event is logged, in the same step.
            assert nothing_waiting(sock), payload
        # The device is still served afterwards.
        sock.sendto(b"hello again", ("127.0.0.1", uplink.port))
        assert sock.recv(65536) == b"ack hello again"


# -- dropped datagrams ----------------------------------------------------------------------------


@pytest.mark.parametrize("who", ["unknown_device", "device_disabled"])
def test_a_datagram_from_an_unknown_or_disabled_device_is_dropped_and_logged(
    uplink: UdpUplink, who: str
) -> None:
    gw, sink = uplink.gateway, uplink.sink
    source = STRANGER if who == "unknown_device" else uplink.device("buoy-off", status="disabled")
    before = len(sink.requests)
    mark = gw.mark()
    with device_socket(source) as sock:
        sock.sendto(b"let me in", ("127.0.0.1", uplink.port))
        refused = gw.wait_for("listener.refused", since=mark)
        # Logged where the datagram was dropped: nothing was or will be sent for it.
        assert len(sink.requests) == before
        assert nothing_waiting(sock)
    assert (refused["reason"], refused["listener"], refused["source"]) == (who, "udp", source)
    labels = f'listener="udp",outcome="{who}",process="main"'
    metric = f"fleetgate_listener_connections_total{{{labels}}}"
    assert f"{metric} 1.0" in uplink.metrics()


def test_a_destination_that_cannot_be_reached_is_logged_with_its_cause(
    uplink: UdpUplink,
) -> None:
    gw = uplink.gateway
    source = uplink.device("buoy-down")
    mark = gw.mark()
    with device_socket(source) as sock:
        sock.sendto(b"anyone there?", ("127.0.0.1", uplink.down_port))
        refused = gw.wait_for("upstream.refused", since=mark)
        assert nothing_waiting(sock)
    assert (refused["reason"], refused["device"], refused["listener"]) == (
        "connect_failed",
        "buoy-down",
        "udp-down",
    )
    assert refused["source"] == source
    assert refused["detail"]


def _held_listener(port: int, silent: int, max_body_bytes: int) -> str:
    """A udp listener whose destination accepts TCP and never answers: a request stays in
    flight. ``max_body_bytes`` means nothing to udp: changing it changes the listener."""
    return (
        f'\n[destinations.held]\naddress = "127.0.0.1:{silent}"\nserver_name = "localhost"\n'
        'credential = "device-#{device_id}"\nconnect_timeout_s = 120\n'
        f'\n[listeners.udp-held]\nprotocol = "udp"\nbind = "127.0.0.1:{port}"\n'
        f'destination = "held"\nmax_in_flight = 1\nmax_body_bytes = {max_body_bytes}\n'
    )


def test_a_reload_keeps_counting_the_requests_still_in_flight(uplink: UdpUplink) -> None:
    """max_in_flight spans a reload that changes the listener: the request its old instance
    still waits on counts for the new one."""
    gateway = uplink.gateway
    config = gateway.data_dir / "fleetgate.toml"
    original = config.read_text()
    source = uplink.device("udp-held-device")
    port = free_port()
    with socket.create_server(("127.0.0.1", 0)) as silent, device_socket(source) as device:
        silent.settimeout(TIMEOUT_S)
        silent_port = silent.getsockname()[1]
        try:
            mark = gateway.mark()
            config.write_text(original + _held_listener(port, silent_port, 1000))
            gateway.signal(signal.SIGHUP)
            gateway.wait_for("listener.bound", _listener("udp-held"), since=mark)
            device.sendto(b"first", ("127.0.0.1", port))
            held, _ = silent.accept()  # the first request is in flight, and stays there
            with held:
                mark = gateway.mark()
                config.write_text(original + _held_listener(port, silent_port, 1001))
                gateway.signal(signal.SIGHUP)
                gateway.wait_for("listener.bound", _listener("udp-held"), since=mark)
                mark = gateway.mark()
                device.sendto(b"second", ("127.0.0.1", port))
                refused = gateway.wait_for("listener.refused", _listener("udp-held"), since=mark)
                assert refused["reason"] == "overloaded", refused
        finally:
            mark = gateway.mark()
            config.write_text(original)
            gateway.signal(signal.SIGHUP)
            gateway.wait_for("config.reloaded", since=mark, timeout_s=TIMEOUT_S)
