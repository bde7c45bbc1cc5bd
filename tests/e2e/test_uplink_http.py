"""http listeners end to end: a device speaks plain HTTP/1.1 (the real ``curl``) to fleetgate,
and a real HTTPS destination gets the request over verified TLS with the device's own client
certificate, identity headers and an HMAC signature.

One gateway serves the module (its CA must exist before a destination can trust it); each test
writes its own listeners and destinations into the config file and reloads with SIGHUP. Devices
are told apart by source address (``curl --interface 127.0.0.N``). Destinations are
:class:`~support.https_sink.HttpSink` (requiring a client certificate from fleetgate's CA,
``/pki/ca.pem``) and :class:`~support.https_sink.TlsServer` with broken certificates, all signed
by a separate test CA that is the destinations' ``ca_file``.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import hmac
import json
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from e2e.conftest import ADMIN
from e2e.gateway import Gateway, free_port
from e2e.pki_support import fetch, issue_generated, revoke, running_gateway
from fleetgate.dataplane import signing
from support.certs import CertFiles, TestCA, Validity, spki_sha256_b64
from support.https_sink import (
    REFUSED_CERTIFICATE,
    HttpSink,
    RecordedRequest,
    SinkResponse,
    TlsServer,
    stream_pattern,
)

TIMEOUT_S = 20.0
MIB = 1024 * 1024
SIGNING_KEY = b"ingest-signing-key-for-tests-0123456789abcdef"
KEY_ID = "ingest-2026"
IMSI = "440101234567890"
STRANGER = "127.0.0.250"  # a source address no device is registered with

type TomlValue = str | bool | int | float | list[str]
type Table = Mapping[str, TomlValue]


# -- the module's gateway and PKI ----------------------------------------------------------------


@dataclass
class Uplink:
    gateway: Gateway
    fleet_ca: Path  # /pki/ca.pem: what destinations trust for device certificates
    test_ca: TestCA  # signs the destinations' server certificates
    test_cafile: Path
    directory: Path
    base_config: str
    next_source: Iterator[int] = field(default_factory=lambda: iter(range(10, 240)))

    def server_cert(self, stem: str, **kwargs: Any) -> CertFiles:
        return self.test_ca.issue_server(**kwargs).write(self.directory, stem)

    def sink(self, stem: str, **kwargs: Any) -> HttpSink:
        """An HTTPS destination that requires a client certificate issued by fleetgate."""
        return HttpSink(
            self.server_cert(stem),
            client_cafile=self.fleet_ca,
            require_client_cert=True,
            **kwargs,
        )

    def configure(self, listeners: Mapping[str, Table], destinations: Mapping[str, Table]) -> None:
        """Replace the previous test's listeners and destinations; wait until all are bound."""
        text = self.base_config
        for section, tables in (("destinations", destinations), ("listeners", listeners)):
            for name, table in tables.items():
                text += f'\n[{section}."{name}"]\n'
                text += "".join(f"{key} = {_toml(value)}\n" for key, value in table.items())
        (self.gateway.data_dir / "fleetgate.toml").write_text(text)
        mark = self.gateway.mark()
        self.gateway.signal(signal.SIGHUP)
        self.gateway.wait_for("config.reloaded", since=mark, timeout_s=TIMEOUT_S)
        for name in listeners:
            self.gateway.wait_for("listener.bound", _named(name), since=mark)

    def device(self, device_id: str, *, certificate: bool = True, **fields: Any) -> str:
        """A device with a fresh source address and (unless told otherwise) a certificate
        fleetgate issued and keeps the key of: credential ``device-<id>``. Its address."""
        address = f"127.0.0.{next(self.next_source)}"
        with self.gateway.client(ADMIN) as api:
            body = {"id": device_id, "addresses": [address], **fields}
            created = api.post("/v1/devices", json=body)
            assert created.status_code == 201, created.text
            if certificate:
                issue_generated(api, device_id, "ec-p256")
        return address

    def credential(self, **body: Any) -> None:
        with self.gateway.client(ADMIN) as api:
            created = api.post("/v1/credentials", json=body)
            assert created.status_code == 201, created.text


def _named(listener: str) -> Callable[[dict[str, Any]], bool]:
    return lambda event: event.get("listener") == listener


def _toml(value: TomlValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)  # a JSON string or array of strings is a TOML one too


@pytest.fixture(scope="module")
def uplink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Uplink]:
    directory = tmp_path_factory.mktemp("uplink-http")
    with running_gateway(directory / "data", FLEETGATE_ADMIN_TOKEN=ADMIN) as gateway:
        test_ca = TestCA.create("destinations root")
        with gateway.client(ADMIN) as api:
            hmac_key = {
                "id": "ingest-hmac",
                "kind": "hmac",
                "public": {"key_id": KEY_ID},
                "secret": SIGNING_KEY.decode(),
            }
            assert api.post("/v1/credentials", json=hmac_key).status_code == 201
            group = api.post("/v1/groups", json={"name": "meters"})
            assert group.status_code == 201, group.text
        yield Uplink(
            gateway=gateway,
            fleet_ca=fetch(gateway, "/pki/ca.pem", directory / "fleet-ca.pem"),
            test_ca=test_ca,
            test_cafile=test_ca.write_bundle(directory / "destinations-ca.pem"),
            directory=directory,
            base_config=(gateway.data_dir / "fleetgate.toml").read_text(),
        )


def destination(uplink: Uplink, port: int, **extra: TomlValue) -> dict[str, TomlValue]:
    return {
        "address": f"127.0.0.1:{port}",
        "server_name": "localhost",
        "ca_file": str(uplink.test_cafile),
        "credential": "device-#{device_id}",
        "signing_credential": "ingest-hmac",
        **extra,
    }


def http_listener(port: int, destination_name: str, **extra: TomlValue) -> dict[str, TomlValue]:
    return {
        "protocol": "http",
        "bind": f"127.0.0.1:{port}",
        "destination": destination_name,
        **extra,
    }


def one_listener(uplink: Uplink, name: str, dest: Table, **listener: TomlValue) -> str:
    """Configure listener ``name`` going to destination ``name``; its base URL."""
    port = free_port()
    uplink.configure({name: http_listener(port, name, **listener)}, {name: dest})
    return f"http://127.0.0.1:{port}"


# -- curl, the device --------------------------------------------------------------------------


@dataclass(frozen=True)
class Transfer:
    """One URL of a curl run: curl's own account (``-w %{json}``), headers and body."""

    info: dict[str, Any]
    headers: dict[str, list[str]]
    body: bytes

    @property
    def status(self) -> int:
        return int(self.info["response_code"])

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None

    def json(self) -> Any:
        return json.loads(self.body)


def curl(source: str, *transfers: Sequence[str | Path]) -> list[Transfer]:
    """One run of the real ``curl`` from ``source``; each transfer is its options ending with
    the URL, separated by ``--next`` (one process: a kept-alive connection is reused)."""
    binary = shutil.which("curl")
    if binary is None:
        pytest.fail("`curl` is not installed; scripts/test installs the peers", pytrace=False)
    with tempfile.TemporaryDirectory() as scratch:
        argv: list[str] = [binary]
        bodies = [Path(scratch) / f"body-{i}" for i in range(len(transfers))]
        for i, options in enumerate(transfers):
            if i:
                argv.append("--next")
            argv += ["--silent", "--show-error", "--noproxy", "*", "--max-time", str(TIMEOUT_S)]
            argv += ["--interface", source, "--output", str(bodies[i])]
            argv += ["--write-out", "%{json}%{header_json}", *(str(o) for o in options)]
        result = subprocess.run(argv, capture_output=True, timeout=TIMEOUT_S * 2, check=False)
        out = result.stdout.decode()
        decoder = json.JSONDecoder()
        documents: list[Any] = []
        position = 0
        while position < len(out.rstrip()):
            document, position = decoder.raw_decode(out, position)
            documents.append(document)
            while position < len(out) and out[position].isspace():
                position += 1
        assert len(documents) == 2 * len(transfers), (result.returncode, out, result.stderr)
        return [
            Transfer(
                info=documents[2 * i],
                headers={k.lower(): v for k, v in documents[2 * i + 1].items()},
                body=bodies[i].read_bytes() if bodies[i].exists() else b"",
            )
            for i in range(len(transfers))
        ]


def curl_one(source: str, *options: str | Path) -> Transfer:
    [transfer] = curl(source, options)
    return transfer


# -- what the destination checks ---------------------------------------------------------------


def lowercase_headers(record: RecordedRequest) -> dict[str, str]:
    """The request's headers keyed in lowercase; fails if any name came twice."""
    headers: dict[str, str] = {}
    for name, value in record.headers:
        assert name.lower() not in headers, f"{name} sent twice: {record.headers}"
        headers[name.lower()] = value
    return headers


def all_values(record: RecordedRequest, name: str) -> list[str]:
    return [v for k, v in record.headers if k.lower() == name.lower()]


def docs_receiver_accepts(
    key: bytes, method: str, target: str, body: bytes, h: Mapping[str, str], seen: set[str]
) -> bool:
    """The receiver docs/uplink.md describes, written from its prose: seven lines joined by
    newlines, HMAC-SHA256 in hex behind ``v1=``, a 300 s window and nonce memory."""
    ts, nonce = h["x-fleetgate-timestamp"], h["x-fleetgate-nonce"]
    if abs(time.time() - int(ts)) > 300 or nonce in seen:
        return False
    digest = hashlib.sha256(body).hexdigest()
    if not hmac.compare_digest(digest, h["x-fleetgate-content-sha256"]):
        return False
    lines = ["v1", ts, nonce, method.upper(), target, digest, h["x-fleetgate-device"]]
    mac = hmac.new(key, "\n".join(lines).encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(f"v1={mac}", h["x-fleetgate-signature"]):
        return False
    seen.add(nonce)
    return True


def fleetgate_verifies(record: RecordedRequest, *, path: str | None = None) -> bool:
    return signing.verify(
        SIGNING_KEY,
        method=record.method,
        target=record.path if path is None else path,
        body=record.body,
        headers=lowercase_headers(record),
        now=int(time.time()),
    )


def assert_problem(transfer: Transfer, status: int, error: str) -> dict[str, Any]:
    """A refusal answered to the device: the status and the JSON ``{"error": ...}``."""
    assert transfer.status == status, (transfer.status, transfer.body)
    assert transfer.header("content-type") == "application/json", transfer.headers
    body: dict[str, Any] = transfer.json()
    assert body["error"] == error, body
    assert isinstance(body["detail"], str)
    return body


# -- identity, headers and signature -------------------------------------------------------------


def test_a_device_request_arrives_signed_with_the_device_certificate_and_identity(
    uplink: Uplink,
) -> None:
    gw = uplink.gateway
    with uplink.sink("ingest") as sink:
        url = one_listener(
            uplink, "ingest", destination(uplink, sink.port, identity_headers=["imsi", "serial"])
        )
        source = uplink.device(
            "meter-7", group="meters", attributes={"imsi": IMSI, "model": "env-v2"}
        )
        mark = gw.mark()
        payload = b'{"t": 21.5, "unit": "C"}'
        sent = curl_one(
            source,
            "--data-binary", payload.decode(),
            "--header", "Content-Type: application/json",
            # A device cannot speak for another one, nor sign for itself.
            "--header", "X-Fleetgate-Device: someone-else",
            "--header", "X-Fleetgate-Group: admins",
            "--header", "X-Fleetgate-Attr-imsi: 000000000000000",
            "--header", "X-Fleetgate-Signature: v1=" + "0" * 64,
            "--header", "X-Forwarded-For: 203.0.113.9",
            f"{url}/readings?site=7&x=%20y",
        )  # fmt: skip
        [record] = sink.requests.wait_for(1)

    assert sent.status == 200, sent.body
    echoed = sent.json()  # the destination's answer, relayed
    assert (echoed["client_cn"], echoed["path"]) == ("meter-7", "/readings?site=7&x=%20y")

    assert record.client_cn == "meter-7"  # the device's own certificate, issued by fleetgate
    assert (record.method, record.path, record.body) == ("POST", "/readings?site=7&x=%20y", payload)
    headers = lowercase_headers(record)  # also: no header came twice
    assert headers["host"] == "localhost"  # the destination's server name
    assert headers["content-type"] == "application/json"
    assert headers["x-fleetgate-device"] == "meter-7"
    assert headers["x-fleetgate-group"] == "meters"
    assert headers["x-fleetgate-attr-imsi"] == IMSI
    assert headers["x-forwarded-for"] == source
    assert headers["x-fleetgate-key-id"] == KEY_ID
    assert headers["x-fleetgate-content-sha256"] == hashlib.sha256(payload).hexdigest()
    assert not any(k.lower() == "x-fleetgate-attr-model" for k, _ in record.headers)
    assert not any(k.lower() == "x-fleetgate-attr-serial" for k, _ in record.headers)
    assert abs(int(headers["x-fleetgate-timestamp"]) - time.time()) < 60

    assert fleetgate_verifies(record)
    seen: set[str] = set()
    assert docs_receiver_accepts(SIGNING_KEY, record.method, record.path, payload, headers, seen)
    # A replay is refused by the receiver's nonce memory; tampering by the signature itself.
    assert not docs_receiver_accepts(SIGNING_KEY, "POST", record.path, payload, headers, seen)
    assert not fleetgate_verifies(record, path="/readings?site=8&x=%20y")
    tampered_body = dataclasses.replace(record, body=payload.replace(b"21", b"31"))
    assert not fleetgate_verifies(tampered_body)
    for method, target, body in [
        ("POST", "/readings?site=8&x=%20y", payload),
        ("POST", record.path, payload.replace(b"21", b"31")),
        ("PUT", record.path, payload),
    ]:
        assert not docs_receiver_accepts(SIGNING_KEY, method, target, body, headers, set())
    forged = {**headers, "x-fleetgate-device": "someone-else"}
    assert not docs_receiver_accepts(SIGNING_KEY, "POST", record.path, payload, forged, set())

    forwarded = gw.wait_for("http.forwarded", since=mark)
    assert (forwarded["device"], forwarded["destination"]) == ("meter-7", "ingest")
    assert (forwarded["method"], forwarded["status"]) == ("POST", 200)


def test_a_get_without_a_body_is_signed_over_the_digest_of_nothing(uplink: Uplink) -> None:
    with uplink.sink("empty-body") as sink:
        url = one_listener(uplink, "empty-body", destination(uplink, sink.port))
        source = uplink.device("meter-get")
        assert curl_one(source, f"{url}/config?v=2").status == 200
        [record] = sink.requests.wait_for(1)
    headers = lowercase_headers(record)
    assert (record.method, record.body) == ("GET", b"")
    assert headers["x-fleetgate-content-sha256"] == hashlib.sha256(b"").hexdigest()
    assert fleetgate_verifies(record)
    assert docs_receiver_accepts(SIGNING_KEY, "GET", "/config?v=2", b"", headers, set())


# -- keep-alive, pooling, bodies -----------------------------------------------------------------


def test_requests_on_one_device_connection_share_one_upstream_connection(uplink: Uplink) -> None:
    with uplink.sink("pooled") as sink:
        url = one_listener(uplink, "pooled", destination(uplink, sink.port))
        source = uplink.device("meter-pool")
        first, second = curl(source, [f"{url}/one"], [f"{url}/two"])
        # Another device connection later: the pool of this device's credential serves it.
        third = curl_one(source, f"{url}/three")
        # Another device never rides on it: its own connection, its own certificate.
        other = curl_one(uplink.device("meter-pool-2"), f"{url}/other")
        records = sink.requests.wait_for(4)

    assert [t.status for t in (first, second, third, other)] == [200, 200, 200, 200]
    # curl kept its connection to fleetgate alive between the first two...
    assert [first.info["num_connects"], second.info["num_connects"]] == [1, 0]
    assert first.info["local_port"] == second.info["local_port"]
    # ... and fleetgate kept one TLS connection to the destination for all three.
    mine, theirs = records[:3], records[3]
    assert [r.path for r in mine] == ["/one", "/two", "/three"]
    assert len({r.peer for r in mine}) == 1, [r.peer for r in records]
    assert [r.client_cn for r in mine] == ["meter-pool"] * 3
    assert (theirs.path, theirs.client_cn) == ("/other", "meter-pool-2")
    assert theirs.peer != mine[0].peer
    assert len({lowercase_headers(r)["x-fleetgate-nonce"] for r in records}) == 4
    assert all(fleetgate_verifies(r) for r in records)


def test_a_one_mib_body_arrives_intact_and_a_larger_one_is_refused_413(
    uplink: Uplink, tmp_path: Path
) -> None:
    gw = uplink.gateway
    with uplink.sink("bodies") as sink:
        url = one_listener(uplink, "bodies", destination(uplink, sink.port))
        source = uplink.device("meter-body")
        payload = stream_pattern(MIB, 13)
        (tmp_path / "exact.bin").write_bytes(payload)
        (tmp_path / "over.bin").write_bytes(payload + b"!")
        accepted = curl_one(source, "--data-binary", f"@{tmp_path / 'exact.bin'}", f"{url}/up")
        [record] = sink.requests.wait_for(1)

        mark = gw.mark()
        refused = curl_one(source, "--data-binary", f"@{tmp_path / 'over.bin'}", f"{url}/up")
        event = gw.wait_for("listener.refused", since=mark)
        assert len(sink.requests) == 1  # the refusal is logged before anything could be sent

    assert accepted.status == 200, accepted.body
    assert accepted.json()["body_bytes"] == MIB
    assert record.body == payload
    headers = lowercase_headers(record)
    assert headers["x-fleetgate-content-sha256"] == hashlib.sha256(payload).hexdigest()
    assert fleetgate_verifies(record)

    assert_problem(refused, 413, "body_too_large")
    assert (event["reason"], event["device"], event["source"]) == (
        "body_too_large",
        "meter-body",
        source,
    )


def test_a_chunked_upload_over_the_limit_is_refused_413(uplink: Uplink, tmp_path: Path) -> None:
    """Without a Content-Length the limit is enforced while reading."""
    gw = uplink.gateway
    with uplink.sink("chunked") as sink:
        url = one_listener(
            uplink, "chunked", destination(uplink, sink.port), max_body_bytes=64 * 1024
        )
        source = uplink.device("meter-chunked")
        small, large = tmp_path / "small.bin", tmp_path / "large.bin"
        small.write_bytes(stream_pattern(60 * 1024))
        large.write_bytes(stream_pattern(64 * 1024 + 1))
        chunked = ["--header", "Transfer-Encoding: chunked", "--data-binary"]
        accepted = curl_one(source, *chunked, f"@{small}", f"{url}/up")
        [record] = sink.requests.wait_for(1)
        mark = gw.mark()
        refused = curl_one(source, *chunked, f"@{large}", f"{url}/up")
        event = gw.wait_for("listener.refused", since=mark)
        assert len(sink.requests) == 1

    assert accepted.status == 200
    assert record.body == small.read_bytes()
    assert fleetgate_verifies(record)
    assert_problem(refused, 413, "body_too_large")
    assert event["reason"] == "body_too_large"


def test_a_large_response_streams_back_intact_and_head_works(uplink: Uplink) -> None:
    size = 8 * MIB

    def answer(request: RecordedRequest) -> SinkResponse:
        if request.path.startswith("/stream"):
            return SinkResponse(stream_bytes=size, content_type="application/x-firmware")
        return SinkResponse()

    with uplink.sink("stream", response=answer) as sink:
        url = one_listener(uplink, "stream", destination(uplink, sink.port))
        source = uplink.device("meter-stream")
        [download] = curl(source, [f"{url}/stream/firmware.bin"])
        # HEAD then GET on one connection: a HEAD answer carries no body, whatever its headers
        # announce, and the next response must not be mistaken for it.
        head, head_stream, after = curl(
            source, ["--head", f"{url}/meta"], ["--head", f"{url}/stream/x"], [f"{url}/after"]
        )
        records = sink.requests.wait_for(4)

    assert download.status == 200
    assert download.header("content-type") == "application/x-firmware"
    assert len(download.body) == size
    assert download.body == stream_pattern(size)

    assert [r.method for r in records] == ["GET", "HEAD", "HEAD", "GET"]
    # curl --head writes the header block where a body would go; no body byte followed it.
    assert head.status == 200
    assert head.info["size_download"] == 0
    announced = json.dumps(records[1].echo()).encode()
    assert head.header("content-length") == str(len(announced))
    assert head.header("content-type") == "application/json"
    assert head_stream.status == 200
    assert head_stream.info["size_download"] == 0
    assert after.status == 200
    assert after.json()["path"] == "/after"
    assert [t.info["num_connects"] for t in (head, head_stream, after)] == [1, 0, 0]


# -- destination failures ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cause",
    [
        "certificate_expired",
        "certificate_not_yet_valid",
        "hostname_mismatch",
        "unknown_ca",
        "pin_mismatch",
        "connect_failed",
    ],
)
def test_a_failing_destination_is_answered_502_naming_the_cause(uplink: Uplink, cause: str) -> None:
    gw = uplink.gateway
    extra: dict[str, TomlValue] = {}
    now = uplink.test_ca.now
    issued = None
    match cause:
        case "certificate_expired":
            issued = uplink.test_ca.issue_server(validity=Validity.expired(now))
        case "certificate_not_yet_valid":
            issued = uplink.test_ca.issue_server(validity=Validity.not_yet_valid(now))
        case "hostname_mismatch":
            issued = uplink.test_ca.issue_server(dns_names=("other.test",), ip_addresses=())
        case "unknown_ca":
            issued = TestCA.create("stranger", now=now).issue_server()
        case "pin_mismatch":
            issued = uplink.test_ca.issue_server()
            extra["pin_sha256"] = [spki_sha256_b64(TestCA.create("unpinned").certificate)]
    name = cause.replace("_", "-")
    device_id = f"meter-{name}"
    server = TlsServer(issued.write(uplink.directory, cause)) if issued else None
    try:
        port = server.port if server else free_port()  # connect_failed: nobody listens
        url = one_listener(uplink, name, destination(uplink, port, **extra))
        source = uplink.device(device_id)
        mark = gw.mark()
        answered = curl_one(source, "--data-binary", "never delivered", f"{url}/readings")
        refused = gw.wait_for("upstream.refused", since=mark)
        if server is not None and cause == "pin_mismatch":
            # The chain verified, the server finished its handshake; the pin check closed the
            # connection before a byte of the request was sent.
            [ended] = server.connections.wait_for(1)
            assert ended.received == b""
        elif server is not None:
            server.handshake_failures.wait_for(1)
            assert not server.sessions.snapshot()
    finally:
        if server is not None:
            server.stop()

    problem = assert_problem(answered, 502, cause)
    assert problem["detail"]
    assert refused["reason"] == cause, refused
    assert (refused["device"], refused["listener"], refused["source"]) == (
        device_id,
        name,
        source,
    )
    assert refused["detail"]


def test_the_right_pin_lets_the_request_through(uplink: Uplink) -> None:
    with uplink.sink("pinned") as sink:
        pins = [
            spki_sha256_b64(TestCA.create("unpinned").certificate),
            spki_sha256_b64(uplink.test_ca.certificate),  # any certificate of the chain
        ]
        url = one_listener(uplink, "pinned", destination(uplink, sink.port, pin_sha256=pins))
        source = uplink.device("meter-pinned")
        answered = curl_one(source, f"{url}/pinned")
        [record] = sink.requests.wait_for(1)
    assert answered.status == 200
    assert record.client_cn == "meter-pinned"


def test_a_destination_refusing_the_device_certificate_is_named(uplink: Uplink) -> None:
    """The destination trusts another CA: with TLS 1.3 the client learns it only after its own
    handshake finished, when the server's alert arrives with the first read."""
    gw = uplink.gateway
    other_ca = TestCA.create("someone else's devices")
    other_cafile = other_ca.write_bundle(uplink.directory / "other-devices.pem")
    with HttpSink(
        uplink.server_cert("refuses-devices"), client_cafile=other_cafile, require_client_cert=True
    ) as sink:
        url = one_listener(uplink, "refuses", destination(uplink, sink.port))
        source = uplink.device("meter-refused")
        mark = gw.mark()
        answered = curl_one(source, f"{url}/x")
        refused = gw.wait_for("upstream.refused", since=mark)
        assert not sink.requests.snapshot()
    assert refused["reason"] in REFUSED_CERTIFICATE, refused
    assert_problem(answered, 502, refused["reason"])


# -- device refusals -------------------------------------------------------------------------------


def test_unknown_and_disabled_devices_are_refused_403(uplink: Uplink, tmp_path: Path) -> None:
    gw = uplink.gateway
    with uplink.sink("refusals") as sink:
        url = one_listener(uplink, "refusals", destination(uplink, sink.port))
        mark = gw.mark()
        unknown = curl_one(STRANGER, f"{url}/x")
        refused_unknown = gw.wait_for("listener.refused", since=mark)
        # Refused while its body is still arriving: the answer must not be lost to a reset.
        body = tmp_path / "body.bin"
        body.write_bytes(stream_pattern(4 * MIB))
        unknown_post = curl_one(
            STRANGER, "--header", "Expect:", "--data-binary", f"@{body}", f"{url}/x"
        )

        source = uplink.device("meter-off", status="disabled")
        mark = gw.mark()
        disabled = curl_one(source, f"{url}/x")
        refused_disabled = gw.wait_for("listener.refused", since=mark)

        with uplink.gateway.client(ADMIN) as api:
            patched = api.patch("/v1/devices/meter-off", json={"status": "enabled"})
            assert patched.status_code == 200, patched.text
        enabled = curl_one(source, f"{url}/x")
        [record] = sink.requests.wait_for(1)

    assert_problem(unknown, 403, "unknown_device")
    assert_problem(unknown_post, 403, "unknown_device")
    assert (refused_unknown["reason"], refused_unknown["source"]) == ("unknown_device", STRANGER)
    assert_problem(disabled, 403, "device_disabled")
    assert refused_disabled["reason"] == "device_disabled"
    assert enabled.status == 200
    assert record.client_cn == "meter-off"


def test_username_identity_with_http_basic(uplink: Uplink) -> None:
    gw = uplink.gateway
    with uplink.sink("login") as sink:
        url = one_listener(
            uplink,
            "login",
            destination(uplink, sink.port),
            identity="username",
            password_credential="login-#{device_id}",
        )
        uplink.device("meter-login")  # its registered address plays no part here
        uplink.credential(
            id="login-meter-login",
            kind="password",
            device_id="meter-login",
            public={"username": "meter-login"},
            secret="correct horse battery",
        )
        right = curl_one(STRANGER, "--user", "meter-login:correct horse battery", f"{url}/in")
        [record] = sink.requests.wait_for(1)
        mark = gw.mark()
        wrong = curl_one(STRANGER, "--user", "meter-login:wrong", f"{url}/in")
        refused = gw.wait_for("listener.refused", since=mark)
        mark = gw.mark()
        nobody = curl_one(STRANGER, "--user", "nobody:correct horse battery", f"{url}/in")
        refused_nobody = gw.wait_for("listener.refused", since=mark)
        anonymous = curl_one(STRANGER, f"{url}/in")
        assert len(sink.requests) == 1

    assert right.status == 200
    assert record.client_cn == "meter-login"
    headers = lowercase_headers(record)
    assert "authorization" not in headers  # the device's login stays at fleetgate
    assert headers["x-fleetgate-device"] == "meter-login"
    assert headers["x-forwarded-for"] == STRANGER

    assert_problem(wrong, 401, "bad_credentials")
    assert wrong.header("www-authenticate") == 'Basic realm="fleetgate"'
    assert refused["reason"] == "bad_credentials"
    # A name that is no device's gets the very same answer (no telling which ids exist);
    # only the log says why.
    assert_problem(nobody, 401, "bad_credentials")
    assert nobody.body == wrong.body
    assert nobody.header("www-authenticate") == 'Basic realm="fleetgate"'
    assert refused_nobody["reason"] == "unknown_device"
    assert_problem(anonymous, 401, "bad_credentials")
    assert anonymous.header("www-authenticate") == 'Basic realm="fleetgate"'


def test_login_credential_is_injected_as_basic_auth_instead_of_the_devices(
    uplink: Uplink,
) -> None:
    with uplink.sink("inject") as sink:
        url = one_listener(
            uplink,
            "inject",
            destination(uplink, sink.port, login_credential="upstream-#{device_id}"),
        )
        source = uplink.device("meter-inject")
        uplink.credential(
            id="upstream-meter-inject",
            kind="password",
            device_id="meter-inject",
            public={"username": "svc-meter-9"},
            secret="upstream pass:word",
        )
        answered = curl_one(
            source, "--header", "Authorization: Bearer the-device-own-token", f"{url}/in"
        )
        [record] = sink.requests.wait_for(1)
    assert answered.status == 200
    expected = base64.b64encode(b"svc-meter-9:upstream pass:word").decode()
    assert all_values(record, "authorization") == [f"Basic {expected}"]
    assert fleetgate_verifies(record)


# -- revocation and re-issue -----------------------------------------------------------------------


def test_a_revoked_certificate_is_never_presented_and_a_new_one_is(uplink: Uplink) -> None:
    gw = uplink.gateway
    with uplink.sink("revocation") as sink:
        url = one_listener(uplink, "revocation", destination(uplink, sink.port))
        source = uplink.device("meter-revoked", certificate=False)
        with gw.client(ADMIN) as api:
            first = issue_generated(api, "meter-revoked", "ec-p256")
        assert curl_one(source, f"{url}/before").status == 200

        mark = gw.mark()
        with gw.client(ADMIN) as api:
            revoke(api, first["certificate"]["serial"])
        gw.wait_for("registry.invalidated", since=mark)
        mark = gw.mark()
        after_revoke = curl_one(source, f"{url}/revoked")
        refused = gw.wait_for("listener.refused", since=mark)
        assert len(sink.requests) == 1

        mark = gw.mark()
        with gw.client(ADMIN) as api:
            second = issue_generated(api, "meter-revoked", "ec-p256")
        gw.wait_for("registry.invalidated", since=mark)
        after_reissue = curl_one(source, f"{url}/reissued")
        records = sink.requests.wait_for(2)

    assert_problem(after_revoke, 502, "credential_revoked")
    assert (refused["reason"], refused["device"]) == ("credential_revoked", "meter-revoked")
    assert after_reissue.status == 200
    assert [r.path for r in records] == ["/before", "/reissued"]

    def der(pem: str) -> bytes:
        return x509.load_pem_x509_certificate(pem.encode()).public_bytes(Encoding.DER)

    presented = [
        r.tls.client_certificate.der for r in records if r.tls and r.tls.client_certificate
    ]
    assert presented == [der(first["certificate_pem"]), der(second["certificate_pem"])]


def test_a_body_over_the_limit_sent_without_expect_still_gets_its_413(
    uplink: Uplink, tmp_path: Path
) -> None:
    """A device that does not wait for 100-continue has its body on the way when fleetgate
    refuses. Closing a socket with unread bytes makes the kernel send a reset, which can erase
    the answer at the device before it is read (RFC 9112 section 9.6): fleetgate must
    half-close and drain instead. Checked with curl, then with a raw socket that makes the
    unread bytes certain and looks at how the connection ended."""
    gw = uplink.gateway
    with uplink.sink("no-expect") as sink:
        url = one_listener(
            uplink, "no-expect", destination(uplink, sink.port), max_body_bytes=64 * 1024
        )
        port = int(url.rpartition(":")[2])
        source = uplink.device("meter-no-expect")
        body = tmp_path / "body.bin"
        body.write_bytes(stream_pattern(4 * MIB))
        answers = [
            curl_one(source, "--header", "Expect:", "--data-binary", f"@{body}", f"{url}/up")
            for _ in range(5)
        ]

        mark = gw.mark()
        head = f"POST /up HTTP/1.1\r\nHost: gw\r\nContent-Length: {4 * MIB}\r\n\r\n"
        with (
            socket.create_connection(
                ("127.0.0.1", port), timeout=TIMEOUT_S, source_address=(source, 0)
            ) as sock,
            ThreadPoolExecutor(1) as pool,
        ):
            # Headers and the whole body at once: far more than fleetgate reads before it
            # refuses, so bytes are certainly unread when it is done answering.
            sending = pool.submit(_send_ignoring_reset, sock, head.encode() + body.read_bytes())
            status, answer, ending = _read_response_and_ending(sock)
            with contextlib.suppress(OSError):  # not connected any more after a reset
                sock.shutdown(socket.SHUT_WR)
            sending.result(timeout=TIMEOUT_S)
        refused = gw.wait_for("listener.refused", since=mark)
        assert not sink.requests.snapshot()

    assert ending == "fin", f"the connection ended by {ending}, the answer was {status} {answer!r}"
    assert status == 413
    assert json.loads(answer)["error"] == "body_too_large"
    for transfer in answers:
        assert_problem(transfer, 413, "body_too_large")
    assert (refused["reason"], refused["device"]) == ("body_too_large", "meter-no-expect")


def _send_ignoring_reset(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(data)


def _read_response_and_ending(sock: socket.socket) -> tuple[int, bytes, str]:
    """One HTTP/1.1 response with a Content-Length, then how the connection ended: ``fin``
    (a clean close), ``reset``, or ``open`` (more bytes came)."""
    received = bytearray()
    try:
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            if not chunk:
                return 0, bytes(received), "fin"
            received += chunk
        head, _, rest = bytes(received).partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        length = next(
            int(line.split(":", 1)[1])
            for line in lines
            if line.lower().startswith("content-length")
        )
        body = bytearray(rest)
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                return status, bytes(body), "fin"
            body += chunk
        more = sock.recv(65536)
    except ConnectionResetError:
        return 0, bytes(received), "reset"
    return status, bytes(body[:length]), "fin" if not more else "open"
