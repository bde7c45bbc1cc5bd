"""The MQTT uplink end to end: devices speak plain MQTT to a fleetgate ``mqtt`` listener and
reach a real mosquitto over verified TLS, each presenting its own fleetgate-issued certificate.

The broker is the shape met in the field: its TLS listener requires a client certificate
chaining to fleetgate's CA (``/pki/ca.pem``), takes the username from the certificate's CN
(``use_identity_as_username``) and gives each identity only ``devices/<its id>/#``. Its server
certificate comes from a separate test CA, which is the destinations' ``ca_file``. An ACL-free
plain listener is the observer's back door. A raw TLS server (the *probe*) stands in for the
broker where a test must see exactly what fleetgate sent upstream: the CONNECT bytes and the
client certificate.

One gateway, broker and probe serve the whole module (starting them is most of the cost);
each test registers its own devices at its own loopback addresses and uses its own topics and
client ids, and reads the logs only from a mark it took, so the tests do not see each other.

Devices are paho-mqtt and ``mosquitto_pub`` on their own source addresses, or a raw socket with
a hand-built CONNECT where the exact CONNACK bytes, an abrupt close or garbage matter.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import signal
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from paho.mqtt.enums import MQTTProtocolVersion

from e2e.conftest import ADMIN
from e2e.gateway import Gateway, free_port
from e2e.pki_support import add_device, fetch, issue_generated, revoke, running_gateway
from support.certs import TestCA
from support.https_sink import REFUSED_CERTIFICATE, TlsConnection, TlsServer
from support.mosquitto import (
    BrokerTls,
    MosquittoBroker,
    MosquittoNotInstalled,
    find_binary,
    running_mosquitto,
)
from support.mqtt_peer import Peer

TIMEOUT_S = 15.0
HOST = "127.0.0.1"  # where every listener binds
STRANGER = "127.0.0.3"  # an address registered to nobody
LOGIN_SOURCE = "127.0.0.5"  # registered to nobody: identity by username needs no address

# Each identity may touch only its own topics; feed-reader may also read feed-writer's.
ACL = """\
pattern readwrite devices/%u/#

user feed-reader
topic read devices/feed-writer/#
"""

V311, V5 = MQTTProtocolVersion.MQTTv311, MQTTProtocolVersion.MQTTv5
LEVEL = {V311: 4, V5: 5}
MOSQUITTO_PROTOCOL = {V311: "p2", V5: "p5"}  # how mosquitto's log names them
PROTOCOLS = [pytest.param(V311, id="mqtt-3.1.1"), pytest.param(V5, id="mqtt-5.0")]

# The refusal CONNACKs, byte for byte: 3.1.1 return codes and 5.0 reason codes.
CONNACK_311 = {"server_unavailable": 3, "bad_credentials": 4, "not_authorized": 5}
CONNACK_5 = {"server_unavailable": 0x88, "bad_credentials": 0x86, "not_authorized": 0x87}


def refused_connack(level: int, code: str) -> bytes:
    if level == 5:
        return bytes((0x20, 3, 0, CONNACK_5[code], 0))  # no properties
    return bytes((0x20, 2, 0, CONNACK_311[code]))


def accepted(packet: bytes) -> bool:
    """A CONNACK with return/reason code 0 (3.1.1 or 5.0, with or without properties)."""
    return len(packet) >= 4 and packet[0] == 0x20 and packet[3] == 0


# -- the gateway's configuration -----------------------------------------------------------------

LOGIN = {"identity": "username", "password_credential": "login-#{device_id}"}
# Listener name -> its settings besides protocol and bind.
LISTENERS: Mapping[str, Mapping[str, str | int]] = {
    "m": {"destination": "broker"},
    "login": {"destination": "broker", **LOGIN},
    "mounted": {"destination": "mounted"},
    "down": {"destination": "down"},
    "small": {"destination": "broker", "max_packet_bytes": 1024},
    "probe": {"destination": "probe"},
    "probe-login": {"destination": "probe", **LOGIN},
    # Destinations that fail fleetgate's checks, or refuse fleetgate's certificate.
    "unknown-ca": {"destination": "unknown-ca"},
    "pin-mismatch": {"destination": "pin-mismatch"},
    "client-certificate-refused": {"destination": "client-certificate-refused"},
}
WRONG_PIN = "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="  # SHA-256 of nothing


def _toml(tables: Mapping[str, Mapping[str, str | int | list[str]]]) -> str:
    """TOML tables; a JSON string or number is a valid TOML value."""
    lines: list[str] = []
    for name, values in tables.items():
        lines += ["", f"[{name}]", *(f"{k} = {json.dumps(v)}" for k, v in values.items())]
    return "\n".join(lines) + "\n"


def _uplink_config(
    ports: Mapping[str, int],
    broker_port: int,
    probe_port: int,
    dead_port: int,
    ca_file: Path,
    *,
    stranger_ca_file: Path,
    untrusting_port: int,
) -> str:
    tls = {"ca_file": str(ca_file), "server_name": "localhost", "credential": "device-#{device_id}"}
    mount = {"topic_mount": "devices/#{device_id}/", "client_id": "#{device_id}"}
    tables: dict[str, Mapping[str, str | int | list[str]]] = {
        "destinations.broker": {"address": f"{HOST}:{broker_port}", **tls},
        "destinations.mounted": {"address": f"{HOST}:{broker_port}", **tls, **mount},
        "destinations.down": {"address": f"{HOST}:{dead_port}", **tls},
        "destinations.probe": {"address": f"{HOST}:{probe_port}", **tls},
        "destinations.unknown-ca": {
            "address": f"{HOST}:{broker_port}",
            **tls,
            "ca_file": str(stranger_ca_file),
        },
        "destinations.pin-mismatch": {
            "address": f"{HOST}:{broker_port}",
            **tls,
            "pin_sha256": [WRONG_PIN],
        },
        "destinations.client-certificate-refused": {"address": f"{HOST}:{untrusting_port}", **tls},
    }
    for name, settings in LISTENERS.items():
        bind = f"{HOST}:{ports[name]}"
        tables[f'listeners."{name}"'] = {"protocol": "mqtt", "bind": bind, **settings}
    return _toml(tables)


# -- fixtures ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Device:
    id: str
    source: str  # its registered address
    serial: str  # its certificate's


@dataclass
class Uplink:
    """The gateway with its mqtt listeners (by name in ``ports``), the broker, the probe."""

    gateway: Gateway
    broker: MosquittoBroker
    probe: TlsServer
    ports: Mapping[str, int]
    _addresses: Iterator[str] = field(
        default_factory=lambda: (f"127.0.1.{n}" for n in itertools.count(1))
    )

    def api(self) -> httpx.Client:
        return self.gateway.client(ADMIN)

    def add_device(self, device_id: str, *, source: str | None = None, **fields: Any) -> Device:
        """Register a device (at a fresh loopback address unless given) with a certificate
        fleetgate issues and whose key it keeps (credential ``device-<id>``)."""
        address = source or next(self._addresses)
        with self.api() as api:
            add_device(api, device_id, addresses=[address], **fields)
            issued = issue_generated(api, device_id, "ec-p256")
        assert issued["credential_id"] == f"device-{device_id}"
        return Device(device_id, address, issued["certificate"]["serial"])


def _start_uplink(data_dir: Path, workdir: Path) -> Iterator[Uplink]:
    try:
        find_binary("mosquitto")
        find_binary("mosquitto_pub")
    except MosquittoNotInstalled as exc:
        pytest.fail(str(exc), pytrace=False)
    # The broker trusts fleetgate's CA, which exists once the gateway has started, and the
    # gateway's destinations need the broker's port: so the gateway starts bare, then the
    # broker, then the gateway gets its listeners and destinations through a reload (SIGHUP).
    with running_gateway(data_dir, FLEETGATE_ADMIN_TOKEN=ADMIN) as gateway:
        fleetgate_ca = fetch(gateway, "/pki/ca.pem", workdir / "fleetgate-ca.pem")
        broker_ca = TestCA.create("broker test root")
        broker_ca_file = broker_ca.write_bundle(workdir / "broker-ca.pem")
        server = broker_ca.issue_server(dns_names=("localhost",)).write(workdir, "broker")
        stranger_ca_file = TestCA.create("stranger").write_bundle(workdir / "stranger-ca.pem")
        with (
            running_mosquitto(BrokerTls(fleetgate_ca, server), ACL, plain_listener=True) as broker,
            ConnackProbe(server, client_cafile=fleetgate_ca, require_client_cert=True) as probe,
            # A broker for someone else's devices: fleetgate's certificate is not for it.
            ConnackProbe(
                server, client_cafile=stranger_ca_file, require_client_cert=True
            ) as untrusting,
            socket.socket() as dead,
        ):
            dead.bind((HOST, 0))  # bound and never listening: every connect is refused
            ports = {name: free_port() for name in LISTENERS}
            dead_port = dead.getsockname()[1]
            config = _uplink_config(
                ports,
                broker.port,
                probe.port,
                dead_port,
                broker_ca_file,
                stranger_ca_file=stranger_ca_file,
                untrusting_port=untrusting.port,
            )
            mark = gateway.mark()
            with gateway.data_dir.joinpath("fleetgate.toml").open("a") as out:
                out.write(config)
            gateway.signal(signal.SIGHUP)
            reloaded = gateway.wait_for("config.reloaded", since=mark)
            assert reloaded["listeners"] == sorted(LISTENERS), reloaded
            bound = [e["listener"] for e in events(gateway, "listener.bound", mark)]
            assert sorted(bound) == sorted(LISTENERS), gateway.events[mark:]
            yield Uplink(gateway, broker, probe, ports)


@pytest.fixture(scope="module")
def uplink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Uplink]:
    workdir = tmp_path_factory.mktemp("uplink-mqtt")
    yield from _start_uplink(workdir / "data", workdir)


# -- devices: paho clients, mosquitto_pub, raw sockets -------------------------------------------


@contextlib.contextmanager
def paho_device(
    port: int,
    client_id: str,
    *,
    source: str,
    protocol: MQTTProtocolVersion = V311,
    username: str | None = None,
    password: str | None = None,
    will: tuple[str, bytes] | None = None,
) -> Iterator[Peer]:
    """A paho device connected through a fleetgate listener and accepted by the broker."""
    peer = Peer(client_id, protocol=protocol, username=username, password=password, will=will)
    try:
        reason = peer.start(port, source=source)
        assert not reason.is_failure, f"{client_id} refused: {reason}"
        yield peer
    finally:
        peer.stop()


def paho_refusal(port: int, client_id: str, *, source: str) -> int:
    """The reason code an MQTT 5.0 paho client's CONNECT is refused with."""
    peer = Peer(client_id, protocol=V5)
    try:
        reason = peer.start(port, source=source)
    finally:
        peer.stop()
    assert reason.is_failure, f"{client_id} was accepted"
    return int(reason.value)


_observers = itertools.count(1)


@contextlib.contextmanager
def observer(broker: MosquittoBroker, topic: str, qos: int = 2) -> Iterator[Peer]:
    """A subscriber on the broker's plain, ACL-free listener: it sees what the broker delivers."""
    assert broker.plain_port is not None
    peer = Peer(f"observer-{next(_observers)}")
    try:
        assert not peer.start(broker.plain_port, source=HOST).is_failure
        peer.subscribe(topic, qos)
        yield peer
    finally:
        peer.stop()


def mosquitto_pub(port: int, source: str, *args: str) -> None:
    """``mosquitto_pub`` in plain MQTT to a fleetgate listener, from ``source``."""
    result = subprocess.run(
        [find_binary("mosquitto_pub"), "-h", HOST, "-p", str(port), "-A", source, *args],
        capture_output=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(raw: bytes) -> bytes:
    return len(raw).to_bytes(2) + raw


def connect_packet(
    client_id: str,
    *,
    level: int = 4,
    username: str | None = None,
    password: bytes | None = None,
    will: tuple[str, bytes] | None = None,
) -> bytes:
    """A clean-session CONNECT with keep-alive 30, built by hand from the MQTT specification
    (3.1.1 section 3.1; 5.0 adds the empty property lists)."""
    properties = b"\x00" if level == 5 else b""
    flags = 0x02
    payload = _field(client_id.encode())
    if will is not None:
        flags |= 0x04 | 0x08  # a will at QoS 1
        payload += properties + _field(will[0].encode()) + _field(will[1])
    if username is not None:
        flags |= 0x80
        payload += _field(username.encode())
    if password is not None:
        flags |= 0x40
        payload += _field(password)
    body = _field(b"MQTT") + bytes((level, flags)) + (30).to_bytes(2) + properties + payload
    return b"\x10" + _varint(len(body)) + body


def read_packet(sock: socket.socket) -> bytes:
    """One whole MQTT packet; what there was if the peer closed first."""
    data = bytearray()
    while len(data) < 2 or (data[-1] & 0x80 and len(data) < 5):
        chunk = sock.recv(1)
        if not chunk:
            return bytes(data)
        data += chunk
    length = sum((byte & 0x7F) << (7 * i) for i, byte in enumerate(data[1:]))
    while length:
        chunk = sock.recv(length)
        if not chunk:
            break
        data += chunk
        length -= len(chunk)
    return bytes(data)


def raw_connection(port: int, source: str) -> socket.socket:
    return socket.create_connection((HOST, port), timeout=TIMEOUT_S, source_address=(source, 0))


def answer_to(port: int, data: bytes, *, source: str) -> bytes:
    """Send ``data``; everything the listener answered before closing (a reset closes too)."""
    received = bytearray()
    with raw_connection(port, source) as sock:
        sock.sendall(data)
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                received += chunk
    return bytes(received)


def connack_for(port: int, connect: bytes, *, source: str) -> bytes:
    """The CONNACK a CONNECT gets; the device then goes away."""
    with raw_connection(port, source) as sock:
        sock.sendall(connect)
        return read_packet(sock)


class ConnackProbe(TlsServer):
    """The probe: records what fleetgate sends and accepts the first packet with a CONNACK
    in its protocol level, as a broker would (fleetgate relays once the broker answered)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._answered: set[int] = set()
        self._lock = threading.Lock()

    def _on_data(self, conn: ssl.SSLSocket, data: bytes) -> None:
        with self._lock:
            if id(conn) in self._answered:
                return
            self._answered.add(id(conn))
        # Fixed header, remaining length (short here), "\x00\x04MQTT", then the level.
        level = data[2 + 6] if len(data) > 8 else 4
        conn.sendall(b"\x20\x03\x00\x00\x00" if level == 5 else b"\x20\x02\x00\x00")


def through_probe(uplink: Uplink, listener: str, connect: bytes, source: str) -> TlsConnection:
    """What the probe got from fleetgate for one device connection: the client certificate
    and the bytes sent upstream (recorded once the device has gone and fleetgate closed)."""
    before = len(uplink.probe.connections)
    mark = uplink.gateway.mark()
    with raw_connection(uplink.ports[listener], source) as sock:
        sock.sendall(connect)
        uplink.gateway.wait_for("listener.connected", since=mark, timeout_s=TIMEOUT_S)
    return uplink.probe.connections.wait_for(before + 1, TIMEOUT_S)[before]


def serial_of(connection: TlsConnection) -> str:
    """The presented certificate's serial as the API spells it (lowercase hex)."""
    assert connection.session.client_certificate is not None
    der = connection.session.client_certificate.der
    return format(x509.load_der_x509_certificate(der).serial_number, "x")


def events(gateway: Gateway, name: str, since: int) -> list[dict[str, Any]]:
    """The events ``name`` logged so far after ``since`` (for what must not have happened)."""
    return [e for e in gateway.events[since:] if e.get("event") == name]


def wait_for_events(gateway: Gateway, name: str, count: int, since: int) -> list[dict[str, Any]]:
    """The events ``name`` after ``since``, once there are ``count`` of them: the gateway logs
    after it answers, so the device can be done before the event is."""
    seen = 0

    def enough(_: dict[str, Any]) -> bool:
        nonlocal seen
        seen += 1
        return seen >= count

    gateway.wait_for(name, enough, since=since, timeout_s=TIMEOUT_S)
    return events(gateway, name, since)


# -- 1. each device is its own identity at the broker --------------------------------------------


def test_two_devices_reach_the_broker_as_their_own_identities(uplink: Uplink) -> None:
    gw, broker, port = uplink.gateway, uplink.broker, uplink.ports["m"]
    dev_a = uplink.add_device("dev-a", source="127.0.0.1")
    dev_b = uplink.add_device("dev-b", source="127.0.0.2")
    gw_mark = gw.mark()
    with observer(broker, "devices/+/t") as watch:
        mark = broker.log_mark()
        # dev-a, mosquitto_pub from 127.0.0.1: the forbidden publish first (QoS 1, settled
        # before the next one starts), then the allowed one, which is the positive control.
        pub = ("-i", "pub-a", "-q", "1", "-t")
        mosquitto_pub(port, dev_a.source, *pub, "devices/dev-b/t", "-m", "forbidden")
        mosquitto_pub(port, dev_a.source, *pub, "devices/dev-a/t", "-m", "from a")
        # dev-b, paho bound to 127.0.0.2.
        with paho_device(port, "paho-b", source=dev_b.source) as paho_b:
            paho_b.publish("devices/dev-b/t", b"from b", qos=1)
        first, second = watch.next_message(), watch.next_message()
    assert [(m.topic, m.payload) for m in (first, second)] == [
        ("devices/dev-a/t", b"from a"),
        ("devices/dev-b/t", b"from b"),
    ]
    new_client = broker.wait_for_log("New client connected from", since=mark)
    assert "as pub-a (" in new_client
    assert "u'dev-a'" in new_client
    assert "u'dev-b'" in broker.wait_for_log("as paho-b (", since=mark)
    denied = broker.wait_for_log("Denied PUBLISH", since=mark)
    assert broker.log_lines("Denied PUBLISH", since=mark) == [denied]
    assert "from pub-a" in denied
    assert "'devices/dev-b/t'" in denied
    connected = wait_for_events(gw, "listener.connected", 3, gw_mark)
    assert sorted((e["device"], e["source"], e["destination"]) for e in connected) == [
        ("dev-a", "127.0.0.1", "broker"),
        ("dev-a", "127.0.0.1", "broker"),
        ("dev-b", "127.0.0.2", "broker"),
    ]


# -- 2. MQTT semantics pass through: QoS 2, retained, will ---------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_qos2_publish_completes_and_is_delivered_exactly_once(
    uplink: Uplink, protocol: MQTTProtocolVersion
) -> None:
    gw, broker = uplink.gateway, uplink.broker
    dev = uplink.add_device(f"qos2-{LEVEL[protocol]}")
    topic = f"devices/{dev.id}/q2"
    gw_mark = gw.mark()
    with observer(broker, f"devices/{dev.id}/#", qos=2) as watch:
        mark = broker.log_mark()
        with paho_device(uplink.ports["m"], dev.id, source=dev.source, protocol=protocol) as paho:
            paho.publish(topic, b"\x00exactly once\xff", qos=2)
            paho.publish(topic, b"marker", qos=2)
        first, second = watch.next_message(), watch.next_message()
    # Nothing came between the message and the marker: it was delivered once.
    assert (first.topic, first.payload, first.qos) == (topic, b"\x00exactly once\xff", 2)
    assert (second.payload, second.qos) == (b"marker", 2)
    assert watch.pending() == []
    # The broker ran the whole four-packet flow with the device, through fleetgate.
    flow = [
        broker.wait_for_log(f"Received PUBLISH from {dev.id} (d0, q2", since=mark),
        broker.wait_for_log(f"Sending PUBREC to {dev.id}", since=mark),
        broker.wait_for_log(f"Received PUBREL from {dev.id}", since=mark),
        broker.wait_for_log(f"Sending PUBCOMP to {dev.id}", since=mark),
    ]
    log = broker.log_text()[mark:]
    assert [log.index(line) for line in flow] == sorted(log.index(line) for line in flow)
    hello = broker.wait_for_log(f"as {dev.id} (", since=mark)
    assert f"({MOSQUITTO_PROTOCOL[protocol]}," in hello
    assert f"u'{dev.id}'" in hello
    [connected] = wait_for_events(gw, "listener.connected", 1, gw_mark)
    assert (connected["device"], connected["mqtt_level"]) == (dev.id, LEVEL[protocol])
    closed = gw.wait_for("listener.closed", since=gw_mark)
    assert (closed["device"], closed["reason"]) == (dev.id, "closed")


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_retained_message_reaches_a_later_subscriber(
    uplink: Uplink, protocol: MQTTProtocolVersion
) -> None:
    dev = uplink.add_device(f"retain-{LEVEL[protocol]}")
    port, topic = uplink.ports["m"], f"devices/{dev.id}/state"
    with paho_device(port, f"{dev.id}-1", source=dev.source, protocol=protocol) as paho:
        paho.publish(topic, b"on", qos=1, retain=True)
    # A later connection of the same device subscribes after the fact, through fleetgate.
    with paho_device(port, f"{dev.id}-2", source=dev.source, protocol=protocol) as later:
        later.subscribe(f"devices/{dev.id}/#", qos=1)
        message = later.next_message()
    assert (message.topic, message.payload, message.retain) == (topic, b"on", True)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_will_is_published_when_the_device_drops_without_disconnect(
    uplink: Uplink, protocol: MQTTProtocolVersion
) -> None:
    level = LEVEL[protocol]
    dev = uplink.add_device(f"will-{level}")
    topic = f"devices/{dev.id}/status"
    connect = connect_packet(dev.id, level=level, will=(topic, b"gone"))
    with observer(uplink.broker, f"devices/{dev.id}/#", qos=1) as watch:
        with raw_connection(uplink.ports["m"], dev.source) as sock:
            sock.sendall(connect)
            connack = read_packet(sock)
            assert accepted(connack), connack.hex()
            assert watch.pending() == []  # no will while the device is connected
            # The socket closes here without a DISCONNECT: the broker must publish the will.
        message = watch.next_message()
    assert (message.topic, message.payload, message.qos) == (topic, b"gone", 1)


# -- 3. a device subscribed through fleetgate ----------------------------------------------------


def test_device_subscribed_through_fleetgate_receives_another_devices_publish(
    uplink: Uplink,
) -> None:
    broker, port = uplink.broker, uplink.ports["m"]
    writer, reader = uplink.add_device("feed-writer"), uplink.add_device("feed-reader")
    topic = "devices/feed-writer/r"
    with paho_device(port, "feed-reader-sub", source=reader.source) as sub:
        sub.subscribe("devices/feed-writer/#", qos=2)
        mark = broker.log_mark()
        for text in ("reading", "marker"):
            mosquitto_pub(port, writer.source, "-i", "feed-w", "-q", "2", "-t", topic, "-m", text)
        first, second = sub.next_message(), sub.next_message()
        broker.wait_for_log("Received PUBCOMP from feed-reader-sub", since=mark)  # delivery leg
        assert sub.pending() == []
    assert (first.topic, first.payload, first.qos) == (topic, b"reading", 2)
    assert second.payload == b"marker"
    assert "u'feed-reader'" in broker.wait_for_log("as feed-reader-sub (")
    assert "u'feed-writer'" in broker.wait_for_log("as feed-w (", since=mark)


# -- 4. refusals ---------------------------------------------------------------------------------


def test_unknown_source_address_is_not_authorized(uplink: Uplink) -> None:
    gw, port = uplink.gateway, uplink.ports["m"]
    mark, broker_mark = gw.mark(), uplink.broker.log_mark()
    answer = answer_to(port, connect_packet("stranger"), source=STRANGER)
    assert answer == refused_connack(4, "not_authorized")  # 3.1.1 return code 5, then closed
    refused = gw.wait_for("listener.refused", since=mark)
    assert (refused["reason"], refused["source"]) == ("unknown_device", STRANGER)
    assert answer_to(port, connect_packet("stranger", level=5), source=STRANGER) == (
        refused_connack(5, "not_authorized")
    )
    assert paho_refusal(port, "stranger-paho", source=STRANGER) == 0x87
    assert not events(gw, "listener.connected", mark)
    assert "stranger" not in uplink.broker.log_text()[broker_mark:]


def test_disabled_device_is_not_authorized(uplink: Uplink) -> None:
    gw, port = uplink.gateway, uplink.ports["m"]
    dev = uplink.add_device("switched-off", status="disabled")
    mark = gw.mark()
    answer = answer_to(port, connect_packet("off"), source=dev.source)
    assert answer == refused_connack(4, "not_authorized")
    refused = gw.wait_for("listener.refused", since=mark)
    assert (refused["reason"], refused["source"]) == ("device_disabled", dev.source)
    assert answer_to(port, connect_packet("off", level=5), source=dev.source) == (
        refused_connack(5, "not_authorized")
    )
    # Enabled, the same device goes through: the refusal was its status.
    with uplink.api() as api:
        assert api.patch(f"/v1/devices/{dev.id}", json={"status": "enabled"}).is_success
    assert accepted(connack_for(port, connect_packet("on"), source=dev.source))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_destination_down_is_server_unavailable(
    uplink: Uplink, protocol: MQTTProtocolVersion
) -> None:
    gw, port, level = uplink.gateway, uplink.ports["down"], LEVEL[protocol]
    dev = uplink.add_device(f"nowhere-{level}")
    mark = gw.mark()
    answer = answer_to(port, connect_packet(dev.id, level=level), source=dev.source)
    assert answer == refused_connack(level, "server_unavailable")  # 3 / 0x88
    refused = gw.wait_for("upstream.refused", since=mark)
    assert (refused["reason"], refused["device"]) == ("connect_failed", dev.id)
    if protocol is V5:
        assert paho_refusal(port, f"{dev.id}-paho", source=dev.source) == 0x88


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("cause", ["unknown_ca", "pin_mismatch", "client_certificate_refused"])
def test_a_destination_failing_tls_is_server_unavailable_naming_the_cause(
    uplink: Uplink, protocol: MQTTProtocolVersion, cause: str
) -> None:
    """The broker's certificate fails fleetgate's checks, or (TLS 1.3: after the handshake)
    the broker refuses fleetgate's certificate: either way the device hears "server
    unavailable" and the log says which."""
    gw, level = uplink.gateway, LEVEL[protocol]
    port = uplink.ports[cause.replace("_", "-")]
    dev = uplink.add_device(f"{cause.replace('_', '-')}-{level}")
    mark = gw.mark()
    answer = answer_to(port, connect_packet(dev.id, level=level), source=dev.source)
    assert answer == refused_connack(level, "server_unavailable")
    refused = gw.wait_for("upstream.refused", since=mark)
    if cause == "client_certificate_refused":
        assert refused["reason"] in REFUSED_CERTIFICATE, refused
    else:
        assert refused["reason"] == cause, refused
    assert refused["device"] == dev.id, refused
    assert refused["detail"]


@pytest.mark.parametrize(
    ("case", "garbage"),
    [
        # Shorter than the length its first bytes would declare as MQTT ("E" is 69): only the
        # first byte can tell, and the device waits for an answer meanwhile.
        ("request-line", b"GET / HTTP/1.1\r\n"),
        (
            "whole-request",
            b"GET /devices HTTP/1.1\r\nHost: gateway.example\r\nUser-Agent: curl/8.5.0\r\n"
            b"Accept: */*\r\n\r\n",
        ),
    ],
    ids=["request-line", "whole-request"],
)
def test_garbage_instead_of_connect_is_closed_at_once(
    uplink: Uplink, case: str, garbage: bytes
) -> None:
    gw, port = uplink.gateway, uplink.ports["m"]
    dev = uplink.add_device(f"speaks-http-{case}")
    mark = gw.mark()
    assert answer_to(port, garbage, source=dev.source) == b""  # closed, nothing answered
    refused = gw.wait_for("listener.refused", since=mark)
    # Refused for what it sent, not after waiting out first_packet_timeout_s.
    assert refused["reason"] == "not_mqtt" or refused["reason"].startswith("mqtt_"), refused
    assert refused["source"] == dev.source
    assert not events(gw, "listener.connected", mark)


def test_connect_larger_than_max_packet_bytes_is_refused(uplink: Uplink) -> None:
    gw, broker, port = uplink.gateway, uplink.broker, uplink.ports["small"]  # 1024 bytes
    dev = uplink.add_device("chatty")
    topic = f"devices/{dev.id}/will"
    # The positive control: the same CONNECT with a small will passes.
    assert accepted(
        connack_for(port, connect_packet("fits", will=(topic, b"w")), source=dev.source)
    )
    broker.wait_for_log("as fits (")
    mark, broker_mark = gw.mark(), broker.log_mark()
    big = connect_packet("too-big", will=(topic, b"w" * 2000))
    answer = answer_to(port, big, source=dev.source)
    assert not accepted(answer), answer.hex()
    refused = gw.wait_for("listener.refused", since=mark)
    assert (refused["reason"], refused["source"]) == ("mqtt_packet_too_large", dev.source)
    assert "too-big" not in broker.log_text()[broker_mark:]


# -- 5. identity by username ---------------------------------------------------------------------


def test_username_identity_logs_the_device_in_and_keeps_its_password(uplink: Uplink) -> None:
    gw, broker, port = uplink.gateway, uplink.broker, uplink.ports["login"]
    dev = uplink.add_device("by-login")
    with uplink.api() as api:
        login = {"username": dev.id}
        created = api.post(
            "/v1/credentials",
            json={"id": f"login-{dev.id}", "kind": "password", "device_id": dev.id,
                  "public": login, "secret": "s3cret-pw"},
        )  # fmt: skip
        assert created.status_code == 201, created.text
    topic = f"devices/{dev.id}/t"
    # From an address nobody registered: the username and password say who it is.
    gw_mark = gw.mark()
    with observer(broker, topic, qos=1) as watch:
        mark = broker.log_mark()
        with paho_device(
            port, "login-1", source=LOGIN_SOURCE, username=dev.id, password="s3cret-pw"
        ) as paho:
            paho.publish(topic, b"logged in", qos=1)
        message = watch.next_message()
    assert (message.topic, message.payload) == (topic, b"logged in")
    # The broker knows the device by its certificate (and its ACL let the publish through).
    assert f"u'{dev.id}'" in broker.wait_for_log("as login-1 (", since=mark)
    [connected] = wait_for_events(gw, "listener.connected", 1, gw_mark)
    assert (connected["device"], connected["source"]) == (dev.id, LOGIN_SOURCE)

    # What went upstream: the device's CONNECT without its fleetgate username and password.
    connect = connect_packet("login-2", username=dev.id, password=b"s3cret-pw")
    seen = through_probe(uplink, "probe-login", connect, LOGIN_SOURCE)
    assert seen.session.client_cn == dev.id
    assert seen.received == connect_packet("login-2")
    assert b"s3cret-pw" not in seen.received

    # A wrong password is "bad user name or password", in either protocol version; so is a
    # name that is no device's (the answer must not tell which device ids exist).
    mark = gw.mark()
    for username in (dev.id, "no-such-device"):
        for level in (4, 5):
            wrong = connect_packet("login-3", level=level, username=username, password=b"guess")
            answer = answer_to(port, wrong, source=LOGIN_SOURCE)
            assert answer == refused_connack(level, "bad_credentials"), username  # 4 / 0x86
    refused = wait_for_events(gw, "listener.refused", 4, mark)
    assert [e["reason"] for e in refused] == 2 * ["bad_credentials"] + 2 * ["unknown_device"]


# -- 6. topic mount and client id ----------------------------------------------------------------


def test_topic_mount_confines_the_device_under_its_prefix(uplink: Uplink) -> None:
    gw, broker, port = uplink.gateway, uplink.broker, uplink.ports["mounted"]
    dev = uplink.add_device("mounted-a")
    prefix = f"devices/{dev.id}/"
    with observer(broker, f"{prefix}#", qos=1) as watch:
        mark = broker.log_mark()
        with paho_device(
            port, "whatever-the-device-says", source=dev.source, will=("status", b"lost")
        ) as paho:
            paho.subscribe("cmd", qos=1)
            paho.publish("temp", b"21.5", qos=1)
            seen = watch.next_message()
            assert (seen.topic, seen.payload) == (f"{prefix}temp", b"21.5")

            watch.publish(f"{prefix}cmd", b"reboot", qos=1)
            command = paho.next_message()
            assert (command.topic, command.payload) == ("cmd", b"reboot")

            gw_mark = gw.mark()
            paho.client.publish("$SYS/x", b"sneaky", qos=0)
            assert paho.disconnected.wait(TIMEOUT_S), "the gateway kept the connection open"
            closed = gw.wait_for("listener.closed", since=gw_mark)
        assert watch.next_message().payload == b"reboot"  # the observer's own command
        # The gateway dropped the device: the broker publishes its will, mounted too.
        will = watch.next_message()
        assert (will.topic, will.payload) == (f"{prefix}status", b"lost")
        assert watch.pending() == []
    # The broker knows the connection by the template's client id, not the device's.
    assert f"u'{dev.id}'" in broker.wait_for_log(f"as {dev.id} (", since=mark)
    assert "whatever-the-device-says" not in broker.log_text()[mark:]
    assert "$SYS/x" not in broker.log_text()[mark:]
    assert closed["device"] == dev.id
    assert "forbidden_topic" in closed["reason"], closed


# -- 7. revocation and renewal without a restart -------------------------------------------------


def test_revoked_certificate_is_refused_and_a_new_one_works_at_once(uplink: Uplink) -> None:
    gw, broker, port = uplink.gateway, uplink.broker, uplink.ports["m"]
    dev = uplink.add_device("revoked")
    assert accepted(connack_for(port, connect_packet("rev-1"), source=dev.source))
    assert f"u'{dev.id}'" in broker.wait_for_log("as rev-1 (")
    assert serial_of(through_probe(uplink, "probe", connect_packet("rev-p1"), dev.source)) == (
        dev.serial
    )

    mark = gw.mark()
    with uplink.api() as api:
        revoke(api, dev.serial)
    gw.wait_for("registry.invalidated", since=mark)
    broker_mark = broker.log_mark()
    answer = answer_to(port, connect_packet("rev-2"), source=dev.source)
    assert answer == refused_connack(4, "server_unavailable")
    refused = gw.wait_for("listener.refused", since=mark)
    assert (refused["reason"], refused["device"]) == ("credential_revoked", dev.id)
    assert "rev-2" not in broker.log_text()[broker_mark:]

    mark = gw.mark()
    with uplink.api() as api:
        renewed = issue_generated(api, dev.id, "ec-p256")["certificate"]["serial"]
    gw.wait_for("registry.invalidated", since=mark)
    assert renewed != dev.serial
    assert accepted(connack_for(port, connect_packet("rev-3"), source=dev.source))
    assert f"u'{dev.id}'" in broker.wait_for_log("as rev-3 (")
    assert serial_of(through_probe(uplink, "probe", connect_packet("rev-p2"), dev.source)) == (
        renewed
    )


# -- 8. disabling a device cuts its live connections only ----------------------------------------


def test_disabling_a_device_cuts_its_connection_and_keeps_the_others(uplink: Uplink) -> None:
    gw, port = uplink.gateway, uplink.ports["m"]
    doomed, kept = uplink.add_device("cut-a"), uplink.add_device("cut-b")
    with (
        observer(uplink.broker, "devices/cut-b/#", qos=1) as watch,
        paho_device(port, "live-a", source=doomed.source) as paho_a,
        paho_device(port, "live-b", source=kept.source) as paho_b,
    ):
        mark = gw.mark()
        with uplink.api() as api:
            assert api.patch(f"/v1/devices/{doomed.id}", json={"status": "disabled"}).is_success
        cut = gw.wait_for("listener.connection_cut", since=mark)
        assert (cut["device"], cut["reason"], cut["source"]) == (
            doomed.id,
            "device_disabled",
            doomed.source,
        )
        assert paho_a.disconnected.wait(TIMEOUT_S), f"{doomed.id} is still connected"
        closed = gw.wait_for("listener.closed", lambda e: e["device"] == doomed.id, since=mark)
        assert closed["reason"] == "cancelled"
        # The other device's connection was left alone: it still publishes on it.
        assert not paho_b.disconnected.is_set()
        paho_b.publish("devices/cut-b/t", b"still here", qos=1)
        assert watch.next_message().payload == b"still here"
    assert [e["device"] for e in events(gw, "listener.connection_cut", mark)] == [doomed.id]
