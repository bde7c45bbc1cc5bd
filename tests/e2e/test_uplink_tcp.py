"""tcp listeners relaying a device's plain bytes to a verified TLS destination.

One gateway serves the whole module (its CA must exist before a destination can trust it);
each test writes its own listeners and destinations into the config file and reloads with
SIGHUP. Devices are told apart by source address (127.0.0.N), each test using its own.
Destinations are real TLS servers on 127.0.0.1 (tests/support/https_sink.py, or a raw server
here that reads a PROXY protocol header before its TLS handshake); ``fleetgate connect`` runs
as the real CLI.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from e2e.conftest import ADMIN
from e2e.gateway import Gateway, base_env, fleetgate_argv, free_port
from e2e.pki_support import fetch, issue_generated, running_gateway
from support.certs import (
    CertFiles,
    Issued,
    PeerCertificate,
    TestCA,
    Validity,
    spki_sha256_b64,
)
from support.https_sink import REFUSED_CERTIFICATE, Journal, TlsEchoServer, stream_pattern

TIMEOUT_S = 20.0
MIB = 1024 * 1024

type TomlValue = str | bool | int | float | list[str]
type Table = Mapping[str, TomlValue]


# -- the module's gateway and PKI ----------------------------------------------------------------


@dataclass
class Uplink:
    gateway: Gateway
    fleet_ca: Path  # /pki/ca.pem: what a destination trusts for device certificates
    test_ca: TestCA  # signs the destinations' server certificates
    test_cafile: Path
    directory: Path
    base_config: str
    next_source: Iterator[int] = field(default_factory=lambda: iter(range(10, 250)))

    def server_cert(self, stem: str, **kwargs: Any) -> CertFiles:
        return self.test_ca.issue_server(**kwargs).write(self.directory, stem)

    def configure(self, listeners: Mapping[str, Table], destinations: Mapping[str, Table]) -> None:
        """Replace the previous test's listeners and destinations; wait until all are bound."""
        text = self.base_config
        for section, tables in (("destinations", destinations), ("listeners", listeners)):
            for name, table in tables.items():
                text += f"\n[{section}.{name}]\n"
                text += "".join(f"{key} = {_toml(value)}\n" for key, value in table.items())
        (self.gateway.data_dir / "fleetgate.toml").write_text(text)
        mark = self.gateway.mark()
        self.gateway.signal(signal.SIGHUP)
        self.gateway.wait_for("config.reloaded", since=mark, timeout_s=TIMEOUT_S)
        for name in listeners:
            if "." not in name:  # (``name.tls``: a listener's own table)
                self.gateway.wait_for("listener.bound", _field_is("listener", name), since=mark)

    def device(self, device_id: str) -> str:
        """A device with a fresh source address and a certificate fleetgate issued (and keeps
        the key of): the credential ``device-<id>``. Returns the source address."""
        address = f"127.0.0.{next(self.next_source)}"
        with self.gateway.client(ADMIN) as api:
            created = api.post("/v1/devices", json={"id": device_id, "addresses": [address]})
            assert created.status_code == 201, created.text
            issue_generated(api, device_id, "ec-p256")
        return address

    def metrics(self) -> str:
        with self.gateway.client(None) as api:
            return api.get("/metrics").text


def _field_is(key: str, value: object) -> Callable[[dict[str, Any]], bool]:
    return lambda event: event.get(key) == value


def _toml(value: TomlValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)  # a JSON string or array of strings is a TOML one too


@contextlib.contextmanager
def started_uplink(directory: Path, **env: str) -> Iterator[Uplink]:
    with running_gateway(directory / "data", FLEETGATE_ADMIN_TOKEN=ADMIN, **env) as gateway:
        test_ca = TestCA.create("destinations root")
        yield Uplink(
            gateway=gateway,
            fleet_ca=fetch(gateway, "/pki/ca.pem", directory / "fleet-ca.pem"),
            test_ca=test_ca,
            test_cafile=test_ca.write_bundle(directory / "destinations-ca.pem"),
            directory=directory,
            base_config=(gateway.data_dir / "fleetgate.toml").read_text(),
        )


@pytest.fixture(scope="module")
def uplink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Uplink]:
    with started_uplink(tmp_path_factory.mktemp("uplink-tcp")) as started:
        yield started


def destination(uplink: Uplink, port: int, **extra: TomlValue) -> dict[str, TomlValue]:
    return {
        "address": f"127.0.0.1:{port}",
        "server_name": "localhost",
        "ca_file": str(uplink.test_cafile),
        "credential": "device-#{device_id}",
        **extra,
    }


def tcp_listener(port: int, destination_name: str) -> dict[str, TomlValue]:
    return {"protocol": "tcp", "bind": f"127.0.0.1:{port}", "destination": destination_name}


def connect(port: int, source: str) -> socket.socket:
    return socket.create_connection(
        ("127.0.0.1", port), timeout=TIMEOUT_S, source_address=(source, 0)
    )


def read_to_eof(sock: socket.socket) -> bytes:
    received = bytearray()
    while chunk := sock.recv(65536):
        received += chunk
    return bytes(received)


def read_exactly(sock: socket.socket, count: int) -> bytes:
    received = bytearray()
    while len(received) < count:
        chunk = sock.recv(min(65536, count - len(received)))
        if not chunk:
            break
        received += chunk
    return bytes(received)


def exchange(sock: socket.socket, payload: bytes) -> bytes:
    """Send ``payload`` while reading as many bytes back (an echo cannot deadlock us)."""
    with ThreadPoolExecutor(1) as pool:
        sending = pool.submit(sock.sendall, payload)
        echoed = read_exactly(sock, len(payload))
        sending.result(timeout=TIMEOUT_S)
    return echoed


def refused_by_gateway(sock: socket.socket) -> bool:
    """The gateway closed the device's connection (FIN or reset) without relaying a byte."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


# -- relaying -------------------------------------------------------------------------------------


def test_bytes_flow_both_ways_with_the_device_certificate_and_half_close(uplink: Uplink) -> None:
    gw = uplink.gateway
    trailer = b"the destination's last word, after the device stopped sending"
    with TlsEchoServer(
        uplink.server_cert("relay"),
        client_cafile=uplink.fleet_ca,
        require_client_cert=True,
        after_eof=trailer,
    ) as echo:
        port = free_port()
        uplink.configure(
            {"relay": tcp_listener(port, "echo")}, {"echo": destination(uplink, echo.port)}
        )
        source = uplink.device("sensor-relay")
        payload = stream_pattern(MIB, 7)
        mark = gw.mark()
        with connect(port, source) as sock:
            assert exchange(sock, payload) == payload
            sock.shutdown(socket.SHUT_WR)
            assert read_to_eof(sock) == trailer  # the destination still talks after our EOF
        [connection] = echo.connections.wait_for(1)
    assert connection.received == payload
    assert connection.eof == "close_notify"
    assert connection.session.client_cn == "sensor-relay"
    connected = gw.wait_for("listener.connected", since=mark)
    assert (connected["device"], connected["destination"]) == ("sensor-relay", "echo")
    closed = gw.wait_for("listener.closed", since=mark)
    assert closed["device"] == "sensor-relay"
    assert closed["reason"] == "closed"
    assert (closed["up_bytes"], closed["down_bytes"]) == (MIB, MIB + len(trailer))
    assert closed["relay"] == "core"  # handed over to the tunnel core once set up
    labels = 'listener="relay",outcome="relayed",process="main"'
    metrics = uplink.metrics()
    assert f"fleetgate_listener_connections_total{{{labels}}} 1.0" in metrics
    relays = 'listener="relay",process="main",relay="core"'
    assert f"fleetgate_listener_relays_total{{{relays}}} 1.0" in metrics


def test_a_device_speaking_tls_is_relayed_by_the_core_both_sides_decrypted(
    uplink: Uplink,
) -> None:
    """A tls listener: the device's TLS ends at fleetgate, the destination's starts there with
    the device's certificate; the tunnel core decrypts and encrypts both, and passes each
    close_notify on."""
    gw = uplink.gateway
    with TlsEchoServer(
        uplink.server_cert("sealed"), client_cafile=uplink.fleet_ca, require_client_cert=True
    ) as echo:
        port = free_port()
        uplink.configure(
            {
                "sealed": tcp_listener(port, "echo"),
                "sealed.tls": {"mode": "tls", "server_names": ["localhost"]},
            },
            {"echo": destination(uplink, echo.port)},
        )
        source = uplink.device("sensor-sealed")
        root = fetch(gw, "/pki/root.pem", uplink.directory / "root.pem")
        context = ssl.create_default_context(cafile=str(root))
        payload = stream_pattern(MIB, 11)
        mark = gw.mark()
        with connect(port, source) as raw:
            sock = context.wrap_socket(raw, server_hostname="localhost")
            for offset in range(0, MIB, 64 * 1024):  # in turns: an ssl socket is one thread's
                piece = payload[offset : offset + 64 * 1024]
                sock.sendall(piece)
                assert read_exactly(sock, len(piece)) == piece
            sock.unwrap()  # our close_notify, and the destination's, passed back
        [connection] = echo.connections.wait_for(1)
    assert connection.received == payload
    assert connection.eof == "close_notify"
    assert connection.session.client_cn == "sensor-sealed"
    closed = gw.wait_for("listener.closed", since=mark)
    assert (closed["device"], closed["reason"], closed["relay"]) == (
        "sensor-sealed",
        "closed",
        "core",
    )
    assert (closed["up_bytes"], closed["down_bytes"]) == (MIB, MIB)


@contextlib.contextmanager
def _relayed_by_own_gateway(
    tmp_path: Path, name: str, drain_timeout_s: str
) -> Iterator[tuple[Gateway, socket.socket, TlsEchoServer]]:
    """A gateway of the test's own (to be stopped), and a device connection it relays to an
    echo destination, one exchange done."""
    with (
        started_uplink(tmp_path, FLEETGATE_API__DRAIN_TIMEOUT_S=drain_timeout_s) as own,
        TlsEchoServer(own.server_cert(name), client_cafile=own.fleet_ca) as echo,
    ):
        port = free_port()
        own.configure({name: tcp_listener(port, "echo")}, {"echo": destination(own, echo.port)})
        with connect(port, own.device(f"sensor-{name}")) as sock:
            assert exchange(sock, b"before") == b"before"
            yield own.gateway, sock, echo


def test_a_drain_lets_a_relayed_connection_finish_then_the_gateway_exits(tmp_path: Path) -> None:
    """A relayed connection holds no task of its own (its splice was handed to the core), yet
    a drain waits for it, and ends as soon as it ends."""
    with _relayed_by_own_gateway(tmp_path, "drain", "600") as (gw, sock, _):
        mark = gw.mark()
        gw.signal(signal.SIGTERM)
        gw.wait_for("gateway.draining", since=mark, timeout_s=TIMEOUT_S)
        assert exchange(sock, b"while draining") == b"while draining"
        assert gw.process is not None
        assert gw.process.poll() is None  # still draining
        sock.shutdown(socket.SHUT_WR)
        assert read_to_eof(sock) == b""
        sock.close()
        assert gw.wait_exit(timeout_s=TIMEOUT_S) == 0  # long before the 600 s drain
    closed = next(e for e in gw.events[mark:] if e.get("event") == "listener.closed")
    assert (closed["device"], closed["reason"], closed["relay"]) == (
        "sensor-drain",
        "closed",
        "core",
    )
    assert (closed["listener"], closed["up_bytes"]) == ("drain", len(b"beforewhile draining"))


def test_a_drain_that_runs_out_of_time_cuts_a_relayed_connection(tmp_path: Path) -> None:
    with _relayed_by_own_gateway(tmp_path, "held", "0.5") as (gw, sock, echo):
        mark = gw.mark()
        gw.signal(signal.SIGTERM)
        assert refused_by_gateway(sock)  # the drain's end cut it: EOF or reset
        assert gw.wait_exit(timeout_s=TIMEOUT_S) == 0
        [connection] = echo.connections.wait_for(1)
    assert connection.eof != "close_notify"  # cut, not a complete stream
    closed = next(e for e in gw.events[mark:] if e.get("event") == "listener.closed")
    assert (closed["device"], closed["reason"], closed["relay"]) == (
        "sensor-held",
        "cancelled",
        "core",
    )


# -- PROXY protocol v2 ---------------------------------------------------------------------------

PROXY_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


@dataclass(frozen=True)
class ProxyHeader:
    """A PROXY protocol v2 header as HAProxy's specification lays it out."""

    version: int
    command: int  # 0 LOCAL, 1 PROXY
    family: int  # 1 AF_INET, 2 AF_INET6
    transport: int  # 1 STREAM
    source: tuple[str, int]
    destination: tuple[str, int]
    tlvs: tuple[tuple[int, bytes], ...]

    def tlv(self, kind: int) -> bytes | None:
        return next((value for k, value in self.tlvs if k == kind), None)


def parse_proxy_v2(header: bytes) -> ProxyHeader:
    """Parse one complete header (the 16 fixed bytes and exactly ``len`` more)."""
    if header[:12] != PROXY_SIGNATURE:
        raise ValueError(f"no PROXY v2 signature: {header[:12]!r}")
    version_command, family_transport, length = struct.unpack("!BBH", header[12:16])
    body = header[16:]
    if len(body) != length:
        raise ValueError(f"header says {length} bytes follow, {len(body)} did")
    family = family_transport >> 4
    size = {1: 4, 2: 16}.get(family)
    if size is None:
        raise ValueError(f"address family {family} is not an IP family")
    src = ipaddress.ip_address(body[:size])
    dst = ipaddress.ip_address(body[size : 2 * size])
    src_port, dst_port = struct.unpack("!HH", body[2 * size : 2 * size + 4])
    tlvs: list[tuple[int, bytes]] = []
    rest = body[2 * size + 4 :]
    while rest:
        if len(rest) < 3:
            raise ValueError(f"truncated TLV: {rest!r}")
        kind, value_length = struct.unpack("!BH", rest[:3])
        value = rest[3 : 3 + value_length]
        if len(value) != value_length:
            raise ValueError(f"TLV {kind:#x} is truncated")
        tlvs.append((kind, value))
        rest = rest[3 + value_length :]
    return ProxyHeader(
        version=version_command >> 4,
        command=version_command & 0x0F,
        family=family,
        transport=family_transport & 0x0F,
        source=(str(src), src_port),
        destination=(str(dst), dst_port),
        tlvs=tuple(tlvs),
    )


@dataclass(frozen=True)
class ProxiedConnection:
    header: ProxyHeader
    next_byte: int  # the first byte after the header: 0x16 when a TLS handshake follows
    client_cn: str | None
    received: bytes


class ProxyV2Server:
    """A raw TCP server that reads exactly one PROXY v2 header, then (when given a context)
    performs TLS over the same socket, and echoes until the client's EOF."""

    def __init__(self, context: ssl.SSLContext | None) -> None:
        self._context = context
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.port: int = self._sock.getsockname()[1]
        self.connections: Journal[ProxiedConnection] = Journal()
        self.errors: Journal[str] = Journal()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                try:
                    self._serve(conn)
                except (OSError, ValueError) as exc:
                    self.errors.append(repr(exc))

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(TIMEOUT_S)
        fixed = read_exactly(conn, 16)
        if len(fixed) != 16:
            raise ValueError(f"connection ended after {len(fixed)} bytes")
        (length,) = struct.unpack("!H", fixed[14:16])
        header = parse_proxy_v2(fixed + read_exactly(conn, length))
        next_byte = conn.recv(1, socket.MSG_PEEK)  # nothing consumed: TLS reads it next
        stream: socket.socket = conn
        client_cn = None
        if self._context is not None:
            tls = self._context.wrap_socket(conn, server_side=True)
            stream = tls
            der = tls.getpeercert(binary_form=True)
            if der:
                client_cn = PeerCertificate.from_der(der).common_name
        received = bytearray()
        while chunk := stream.recv(65536):
            received += chunk
            stream.sendall(chunk)
        self.connections.append(
            ProxiedConnection(header, next_byte[0] if next_byte else -1, client_cn, bytes(received))
        )

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=TIMEOUT_S)
        self._sock.close()

    def __enter__(self) -> ProxyV2Server:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _proxied_exchange(
    uplink: Uplink, server: ProxyV2Server, case: str, **extra: TomlValue
) -> tuple[ProxiedConnection, tuple[str, int], int, dict[str, Any]]:
    gw = uplink.gateway
    port = free_port()
    uplink.configure(
        {case: tcp_listener(port, case)},
        {case: destination(uplink, server.port, proxy_protocol=True, **extra)},
    )
    source = uplink.device(f"sensor-{case}")
    mark = gw.mark()
    with connect(port, source) as sock:
        device_address: tuple[str, int] = sock.getsockname()
        assert exchange(sock, b"hello through PROXY") == b"hello through PROXY"
        sock.shutdown(socket.SHUT_WR)
        assert read_to_eof(sock) == b""
    [connection] = server.connections.wait_for(1, timeout_s=TIMEOUT_S)
    assert not server.errors.snapshot()
    connected = gw.wait_for("listener.connected", since=mark)
    return connection, device_address, port, connected


def _check_header(
    header: ProxyHeader,
    device_address: tuple[str, int],
    listener_port: int,
    connected: Mapping[str, Any],
    device_id: str,
) -> None:
    assert (header.version, header.command) == (2, 1)
    assert (header.family, header.transport) == (1, 1)  # TCP over IPv4
    assert header.source == device_address
    assert header.destination == ("127.0.0.1", listener_port)
    assert header.tlv(0x05) == connected["conn"].encode()  # PP2_TYPE_UNIQUE_ID
    assert header.tlv(0xE0) == device_id.encode()


def test_proxy_protocol_header_precedes_the_tls_client_hello(uplink: Uplink) -> None:
    server_files = uplink.server_cert("proxied")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(server_files.cert, server_files.key)
    context.load_verify_locations(cafile=uplink.fleet_ca)
    context.verify_mode = ssl.CERT_REQUIRED
    with ProxyV2Server(context) as server:
        connection, device_address, port, connected = _proxied_exchange(uplink, server, "pp-tls")
    assert connection.next_byte == 0x16  # a TLS handshake record: the ClientHello came after
    assert connection.client_cn == "sensor-pp-tls"
    assert connection.received == b"hello through PROXY"
    _check_header(connection.header, device_address, port, connected, "sensor-pp-tls")


def test_proxy_protocol_header_on_a_plain_destination(uplink: Uplink) -> None:
    with ProxyV2Server(None) as server:
        connection, device_address, port, connected = _proxied_exchange(
            uplink, server, "pp-plain", unsafe_plaintext=True
        )
    assert connection.next_byte == ord("h")  # the device's own first byte
    assert connection.received == b"hello through PROXY"
    _check_header(connection.header, device_address, port, connected, "sensor-pp-plain")


# -- destination failures -----------------------------------------------------------------------


class SilentServer:
    """Accepts TCP connections (the kernel does) and never says a word: no TLS ever starts."""

    def __init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0), backlog=16)
        self.port: int = self._sock.getsockname()[1]

    def __enter__(self) -> SilentServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._sock.close()


# Why the destination's handshake failed, as it reports it: the alert the gateway sent
# before closing, or the destination's own verdict on the device's certificate.
SERVER_SAW = {
    "certificate_expired": "SSLV3_ALERT_CERTIFICATE_EXPIRED",
    "hostname_mismatch": "SSLV3_ALERT_BAD_CERTIFICATE",
    "unknown_ca": "TLSV1_ALERT_UNKNOWN_CA",
    "client_certificate_refused": "CERTIFICATE_VERIFY_FAILED",
}


@pytest.mark.parametrize(
    "cause",
    [
        "certificate_expired",
        "hostname_mismatch",
        "unknown_ca",
        "pin_mismatch",
        "connect_timeout",
        "client_certificate_refused",
    ],
)
def test_a_failing_destination_closes_the_device_connection_naming_the_cause(
    uplink: Uplink, cause: str
) -> None:
    gw = uplink.gateway
    extra: dict[str, TomlValue] = {}
    now = uplink.test_ca.now
    issued: Issued | None
    match cause:
        case "certificate_expired":
            issued = uplink.test_ca.issue_server(validity=Validity.expired(now))
        case "hostname_mismatch":
            issued = uplink.test_ca.issue_server(dns_names=("other.test",), ip_addresses=())
        case "unknown_ca":
            issued = TestCA.create("stranger", now=now).issue_server()
        case "client_certificate_refused":  # the destination does not trust fleetgate's CA
            issued = uplink.test_ca.issue_server()
        case "pin_mismatch":
            issued = uplink.test_ca.issue_server()
            stranger = TestCA.create("unpinned", now=now).issue_server()
            extra["pin_sha256"] = [spki_sha256_b64(stranger.certificate)]
        case _:
            issued = None
            extra["connect_timeout_s"] = 0.5
    listener = cause.replace("_", "-")
    device_id = f"sensor-{listener}"
    refusing = cause == "client_certificate_refused"
    with (
        TlsEchoServer(
            issued.write(uplink.directory, cause),
            client_cafile=uplink.test_cafile if refusing else None,
            require_client_cert=refusing,
        )
        if issued
        else SilentServer()
    ) as server:
        port = free_port()
        uplink.configure(
            {listener: tcp_listener(port, listener)},
            {listener: destination(uplink, server.port, **extra)},
        )
        source = uplink.device(device_id)
        mark = gw.mark()
        started = time.monotonic()
        with connect(port, source) as sock:
            sock.sendall(b"never delivered")
            assert refused_by_gateway(sock)
        elapsed = time.monotonic() - started
        if isinstance(server, TlsEchoServer):
            if cause == "pin_mismatch":
                # The chain verified, so the server finished its handshake; the pin check
                # then closed the connection before a byte was relayed.
                [ended] = server.connections.wait_for(1)
                assert ended.received == b""
            else:
                [failure] = server.handshake_failures.wait_for(1)
                assert failure.reason == SERVER_SAW[cause], failure
                assert not server.sessions.snapshot()
        refused = gw.wait_for("upstream.refused", since=mark, timeout_s=10)
    if cause == "client_certificate_refused":
        assert refused["reason"] in REFUSED_CERTIFICATE, refused
        cause = refused["reason"]
    else:
        assert refused["reason"] == cause, refused
    assert (refused["device"], refused["listener"], refused["source"]) == (
        device_id,
        listener,
        source,
    )
    assert refused["detail"]
    if cause == "connect_timeout":
        assert 0.4 < elapsed < 5  # the destination's 0.5 s, not the default 10 s
    labels = f'listener="{listener}",outcome="{cause}",process="main"'
    metric = f"fleetgate_listener_connections_total{{{labels}}} 1.0"
    assert metric in uplink.metrics()


# -- session resumption ---------------------------------------------------------------------------


class ResumptionEchoServer(TlsEchoServer):
    """An echo server recording, for each connection, whether its TLS session was resumed."""

    def __init__(self, server: CertFiles, client_cafile: Path) -> None:
        self.resumed: Journal[bool] = Journal()
        self._seen: set[tuple[str, int]] = set()
        super().__init__(server, client_cafile=client_cafile, require_client_cert=True)

    def _on_data(self, conn: ssl.SSLSocket, data: bytes) -> None:
        peer = conn.getpeername()
        if peer not in self._seen:
            self._seen.add(peer)
            self.resumed.append(bool(conn.session_reused))
        super()._on_data(conn, data)


@pytest.mark.parametrize("resume", [True, False])
def test_a_second_connection_resumes_the_tls_session_unless_disabled(
    uplink: Uplink, resume: bool
) -> None:
    name = "resume-on" if resume else "resume-off"
    with ResumptionEchoServer(uplink.server_cert(name), uplink.fleet_ca) as echo:
        port = free_port()
        uplink.configure(
            {name: tcp_listener(port, name)},
            {name: destination(uplink, echo.port, session_resumption=resume)},
        )
        source = uplink.device(f"sensor-{name}")
        for attempt in range(2):
            with connect(port, source) as sock:
                assert exchange(sock, b"attempt %d" % attempt) == b"attempt %d" % attempt
                sock.shutdown(socket.SHUT_WR)
                assert read_to_eof(sock) == b""
            echo.connections.wait_for(attempt + 1)
        sessions = echo.sessions.wait_for(2)
    assert echo.resumed.snapshot() == [False, resume]
    assert [s.client_cn for s in sessions] == [f"sensor-{name}"] * 2


def test_a_pin_on_the_root_holds_for_full_and_resumed_handshakes(uplink: Uplink) -> None:
    """A resumed session carries no freshly verified chain; the session came from a pinned
    handshake with this very destination, so it must still be accepted."""
    gw = uplink.gateway
    with ResumptionEchoServer(uplink.server_cert("pinned"), uplink.fleet_ca) as echo:
        port = free_port()
        pin = spki_sha256_b64(uplink.test_ca.certificate)  # any certificate of the chain
        uplink.configure(
            {"pinned": tcp_listener(port, "pinned")},
            {"pinned": destination(uplink, echo.port, pin_sha256=[pin])},
        )
        source = uplink.device("sensor-pinned")
        mark = gw.mark()
        for attempt in range(2):
            with connect(port, source) as sock:
                assert exchange(sock, b"attempt %d" % attempt) == b"attempt %d" % attempt, (
                    f"attempt {attempt}: {[e for e in gw.events[mark:] if 'refused' in e['event']]}"
                )
                sock.shutdown(socket.SHUT_WR)
                assert read_to_eof(sock) == b""
            echo.connections.wait_for(attempt + 1)
    assert echo.resumed.snapshot() == [False, True]


# -- fleetgate connect ----------------------------------------------------------------------------


class ConnectProcess:
    """``fleetgate connect`` as a person runs it; its console log read line by line.
    ``core``: "c" (the tunnel core, built by the install) or "python" (asyncio endpoints and the
    splice, what runs where the core is not built)."""

    def __init__(self, *args: str, core: str = "c") -> None:
        self.port = free_port()
        self.lines: list[str] = []
        self._changed = threading.Condition()
        env = base_env()
        if core == "python":
            env["FLEETGATE_RELAY"] = "python"
        self.process = subprocess.Popen(
            fleetgate_argv("connect", "--listen", f"127.0.0.1:{self.port}", *args),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        listening = self.wait_for_line(lambda line: "connect.listening" in line)
        assert f'core="{core}"' in listening or f"core={core}" in listening, listening

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self.lines.append("<exited>")
            self._changed.notify_all()

    def wait_for_line(self, predicate: Callable[[str], bool]) -> str:
        with self._changed:
            found: list[str] = []

            def seen() -> bool:
                found[:] = [ln for ln in self.lines if predicate(ln)]
                return bool(found) or "<exited>" in self.lines

            self._changed.wait_for(seen, TIMEOUT_S)
            assert found, f"no such line; fleetgate connect said: {self.lines}"
            return found[0]

    def __enter__(self) -> ConnectProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._reader.join(timeout=5)


@pytest.fixture
def connect_pki(tmp_path: Path) -> tuple[TestCA, Path, CertFiles, CertFiles]:
    ca = TestCA.create("connect root")
    return (
        ca,
        ca.write_bundle(tmp_path / "ca.pem"),
        ca.issue_server(dns_names=("echo.test",)).write(tmp_path, "server"),
        ca.issue_client("operator-pc").write(tmp_path, "client"),
    )


CORES = ["c", "python"]


@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize("with_cert", [True, False])
def test_connect_forwards_plain_connections_presenting_the_client_certificate(
    connect_pki: tuple[TestCA, Path, CertFiles, CertFiles], with_cert: bool, core: str
) -> None:
    _, cafile, server, client = connect_pki
    identity = ["--cert", str(client.cert), "--key", str(client.key)] if with_cert else []
    with (
        # The certificate is asked for, not required: what the client sends is its choice.
        TlsEchoServer(server, client_cafile=cafile) as echo,
        ConnectProcess(
            "--to", f"127.0.0.1:{echo.port}", "--cafile", str(cafile),
            "--server-name", "echo.test", *identity, core=core,
        ) as relay,
    ):  # fmt: skip
        payload = stream_pattern(MIB)
        for _ in range(2):  # the second one on a resumed session
            with connect(relay.port, "127.0.0.1") as sock:
                assert exchange(sock, payload) == payload
                sock.shutdown(socket.SHUT_WR)
                assert read_to_eof(sock) == b""
        connections = echo.connections.wait_for(2)
        limits = relay.wait_for_line(lambda ln: "limits.nofile" in ln)
    expected_cn = "operator-pc" if with_cert else None
    assert re.search(r"\bsoft=(\d+) hard=\1\b", limits), limits  # raised to the hard limit
    assert [c.session.client_cn for c in connections] == [expected_cn] * 2
    assert [c.eof for c in connections] == ["close_notify"] * 2
    assert [c.received for c in connections] == [payload] * 2


@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize("cause", ["hostname_mismatch", "unknown_ca", "pin_mismatch"])
def test_connect_refuses_a_destination_it_cannot_verify(
    connect_pki: tuple[TestCA, Path, CertFiles, CertFiles], tmp_path: Path, cause: str, core: str
) -> None:
    _, cafile, server, _ = connect_pki
    args = ["--server-name", "echo.test", "--cafile", str(cafile)]
    match cause:
        case "hostname_mismatch":
            args[1] = "other.test"
        case "unknown_ca":
            args[3] = str(TestCA.create("stranger").write_bundle(tmp_path / "stranger.pem"))
        case _:
            args += ["--pin", spki_sha256_b64(TestCA.create("unpinned").certificate)]
    with (
        TlsEchoServer(server) as echo,
        ConnectProcess("--to", f"127.0.0.1:{echo.port}", *args, core=core) as relay,
    ):
        with connect(relay.port, "127.0.0.1") as sock:
            sock.sendall(b"secret")
            assert refused_by_gateway(sock)
        line = relay.wait_for_line(lambda ln: "connect.refused" in ln)
        if cause == "pin_mismatch" and core == "python":
            # Pins are checked once the handshake is done: the server finished its handshake.
            [ended] = echo.connections.wait_for(1)
            assert ended.received == b""
        else:  # (the tunnel core checks pins with the chain: the handshake fails on them)
            echo.handshake_failures.wait_for(1)
            assert not echo.sessions.snapshot()
    assert re.search(rf'\breason="{cause}"', line), line
    assert 'source="127.0.0.1"' in line


def _connect_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        fleetgate_argv("connect", *args),
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


def test_connect_refuses_to_start_with_unusable_files_or_a_taken_port(
    connect_pki: tuple[TestCA, Path, CertFiles, CertFiles], tmp_path: Path
) -> None:
    _, cafile, server, client = connect_pki
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    to = ["--to", "127.0.0.1:1", "--server-name", "echo.test"]

    bad_ca = _connect_cli("--listen", f"127.0.0.1:{free_port()}", *to, "--cafile", str(junk))
    assert bad_ca.returncode == 78, bad_ca.stderr
    assert bad_ca.stderr.startswith("error: --cafile: cannot be used for TLS"), bad_ca.stderr

    mismatch = _connect_cli(
        "--listen", f"127.0.0.1:{free_port()}", *to, "--cafile", str(cafile),
        "--cert", str(client.cert), "--key", str(server.key),
    )  # fmt: skip
    assert mismatch.returncode == 78, mismatch.stderr
    assert "--cafile, --cert and --key: cannot be used for TLS" in mismatch.stderr
    assert "KEY_VALUES_MISMATCH" in mismatch.stderr

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        busy = _connect_cli("--listen", f"127.0.0.1:{port}", *to, "--cafile", str(cafile))
    assert busy.returncode == 78, busy.stderr
    assert f"error: --listen: cannot bind 127.0.0.1:{port}" in busy.stderr
    assert "Traceback" not in busy.stderr
