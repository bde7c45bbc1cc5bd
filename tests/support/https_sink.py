"""Real upstream servers on 127.0.0.1 for uplink tests: an HTTP(S) sink and raw TLS servers.

Each server binds port 0 (so it is connectable as soon as it is constructed: no probe and no
race), serves every connection in its own thread, and records what it saw in a
:class:`Journal` that tests wait on. The TLS handshake runs in the connection's thread, never the
accept loop, so a client that stalls or fails the handshake blocks nobody; failures are recorded
as :class:`HandshakeFailure` with OpenSSL's reason (``PEER_DID_NOT_RETURN_A_CERTIFICATE``,
``TLSV1_ALERT_UNKNOWN_CA``, ``SSLV3_ALERT_CERTIFICATE_EXPIRED``, ...).

- :class:`HttpSink`: HTTP/1.1 (TLS when given a server certificate, plain otherwise); records
  each request and answers with a configurable :class:`SinkResponse`, which can also stream a
  large chunked body (optionally held after the first chunk until the test releases it).
- :class:`TlsServer`: presents whatever chain it is given (expired, wrong host, unknown CA,
  broken order) and records handshakes and the bytes each client sent; it sends nothing.
- :class:`TlsEchoServer`: the same, echoing bytes back; it records whether the client finished
  with a half-close and can answer one with a trailer, proving the write side stayed open.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import socket
import socketserver
import ssl
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Literal, Self

from support.certs import CertFiles, PeerCertificate

HOST = "127.0.0.1"
IO_TIMEOUT_S = 30.0
MAX_BODY_BYTES = 64 * 1024 * 1024
_PATTERN = bytes(range(256))

type Peer = tuple[str, int]
type Eof = Literal["close_notify", "tcp_fin"]


# A destination refusing fleetgate's certificate under TLS 1.3 says so in an alert after the
# handshake; when its close resets the connection before fleetgate reads the alert, fleetgate
# can only say the connection was reset right after the handshake.
REFUSED_CERTIFICATE: frozenset[str] = frozenset(
    {"client_certificate_refused", "reset_after_handshake"}
)


class Journal[T]:
    """An append-only, thread-safe record that tests can wait on."""

    def __init__(self) -> None:
        self._items: list[T] = []
        self._changed = threading.Condition()

    def append(self, item: T) -> None:
        with self._changed:
            self._items.append(item)
            self._changed.notify_all()

    def snapshot(self) -> list[T]:
        with self._changed:
            return list(self._items)

    def __len__(self) -> int:
        with self._changed:
            return len(self._items)

    def wait_for(self, count: int = 1, timeout_s: float = 10.0) -> list[T]:
        """Every item once there are at least ``count``; :class:`TimeoutError` otherwise."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self._items) >= count, timeout_s):
                raise TimeoutError(f"{len(self._items)} of {count} records after {timeout_s}s")
            return list(self._items)


def server_context(
    server: CertFiles,
    *,
    client_cafile: Path | None = None,
    require_client_cert: bool = False,
    minimum_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2,
) -> ssl.SSLContext:
    """Serve ``server``'s chain; ask for a client certificate whenever a CA is given."""
    if require_client_cert and client_cafile is None:
        raise ValueError("require_client_cert needs client_cafile")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = minimum_version
    context.load_cert_chain(server.cert, server.key)
    if client_cafile is not None:
        context.load_verify_locations(cafile=client_cafile)
        context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return context


def stream_pattern(total_bytes: int, offset: int = 0) -> bytes:
    """The bytes a streamed body holds at ``[offset, offset + total_bytes)``: 0..255 repeated."""
    start = offset % len(_PATTERN)
    return (_PATTERN * (total_bytes // len(_PATTERN) + 2))[start : start + total_bytes]


@dataclass(frozen=True)
class HandshakeFailure:
    peer: Peer
    reason: str  # OpenSSL's reason code, or the OS error's class name
    message: str


@dataclass(frozen=True)
class TlsSession:
    """A completed handshake: what was negotiated and the certificate the client presented."""

    peer: Peer
    version: str | None
    client_certificate: PeerCertificate | None

    @property
    def client_cn(self) -> str | None:
        return None if self.client_certificate is None else self.client_certificate.common_name


def _session(conn: socket.socket, peer: Peer) -> TlsSession | None:
    if not isinstance(conn, ssl.SSLSocket):
        return None
    der = conn.getpeercert(binary_form=True)
    return TlsSession(peer, conn.version(), PeerCertificate.from_der(der) if der else None)


class _Listener(socketserver.ThreadingTCPServer):
    """Accepts on 127.0.0.1:0; the TLS handshake happens in the connection's own thread."""

    allow_reuse_address = True
    daemon_threads = False
    block_on_close = True  # server_close() joins the connection threads

    def __init__(
        self,
        handler: type[socketserver.BaseRequestHandler],
        context: ssl.SSLContext | None,
        failures: Journal[HandshakeFailure],
        *,
        suppress_ragged_eofs: bool,
    ) -> None:
        super().__init__((HOST, 0), handler)
        self._handler = handler
        self.context = context
        self.failures = failures
        self.errors: Journal[str] = Journal()
        self._suppress_ragged_eofs = suppress_ragged_eofs
        self._live: set[socket.socket] = set()
        self._live_lock = threading.Lock()
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.shutdown()
        with self._live_lock:
            for conn in self._live:  # wake handlers blocked in recv
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        self.server_close()
        self._thread.join(timeout=IO_TIMEOUT_S)

    def finish_request(self, request: socket.socket, client_address: Peer) -> None:  # type: ignore[override]
        request.settimeout(IO_TIMEOUT_S)
        conn = request
        if self.context is not None:
            conn = self.context.wrap_socket(
                request,
                server_side=True,
                do_handshake_on_connect=False,
                suppress_ragged_eofs=self._suppress_ragged_eofs,
            )
        self._track(conn)  # before the handshake, so stop() also wakes a stalled one
        try:
            if isinstance(conn, ssl.SSLSocket):
                try:
                    conn.do_handshake()
                except (ssl.SSLError, OSError) as exc:
                    reason = getattr(exc, "reason", None) or type(exc).__name__
                    self.failures.append(HandshakeFailure(client_address, str(reason), str(exc)))
                    return
            self._handler(conn, client_address, self)
        finally:
            self._untrack(conn)
            conn.close()

    def _track(self, conn: socket.socket) -> None:
        with self._live_lock:
            self._live.add(conn)

    def _untrack(self, conn: socket.socket) -> None:
        with self._live_lock:
            self._live.discard(conn)

    def handle_error(self, request: object, client_address: object) -> None:
        self.errors.append(traceback.format_exc())  # kept for the test, not sprayed on stderr


class _ServerBase:
    """Lifecycle shared by the servers: start on construction, stop on exit."""

    _listener: _Listener

    @property
    def host(self) -> str:
        return HOST

    @property
    def port(self) -> int:
        return self._listener.port

    @property
    def handshake_failures(self) -> Journal[HandshakeFailure]:
        return self._listener.failures

    @property
    def errors(self) -> Journal[str]:
        """Tracebacks of exceptions escaping a connection handler: a client that went away
        mid-response (``ConnectionResetError``, ``BrokenPipeError``) or a broken test peer."""
        return self._listener.errors

    def stop(self) -> None:
        self._listener.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# -- HTTP ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordedRequest:
    id: int  # 1, 2, ... in arrival order
    method: str
    path: str
    http_version: str
    headers: tuple[tuple[str, str], ...]
    body: bytes = field(repr=False)
    tls: TlsSession | None  # None in plain-HTTP mode
    peer: Peer

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive)."""
        wanted = name.lower()
        return next((v for k, v in self.headers if k.lower() == wanted), None)

    @property
    def client_cn(self) -> str | None:
        return None if self.tls is None else self.tls.client_cn

    def echo(self) -> dict[str, object]:
        """The default response body: which request this was, as the sink saw it."""
        return {
            "id": self.id,
            "request_id": self.header("x-request-id"),
            "method": self.method,
            "path": self.path,
            "body_bytes": len(self.body),
            "client_cn": self.client_cn,
        }


@dataclass(frozen=True)
class SinkResponse:
    """What the sink answers. ``body=None`` means the JSON :meth:`RecordedRequest.echo`.

    With ``stream_bytes`` set, the body is instead ``stream_pattern(stream_bytes)`` sent with
    chunked encoding in ``stream_chunk_bytes`` pieces; if ``stream_gate`` is given, the sink
    sends the first chunk and then waits for the event before sending the rest (stopping the
    sink sets the event, releasing the held stream).
    """

    status: int = 200
    body: bytes | None = None
    content_type: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    stream_bytes: int | None = None
    stream_chunk_bytes: int = 64 * 1024
    stream_gate: threading.Event | None = field(default=None, compare=False)


type Responder = Callable[[RecordedRequest], SinkResponse]


class _HttpHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    sink: HttpSink  # set on the subclass each sink makes

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _serve(self) -> None:
        self.sink._serve(self)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _serve


def _read_chunked(reader: io.BufferedIOBase) -> bytes:
    parts: list[bytes] = []
    total = 0
    while True:
        size = int(reader.readline(1024).split(b";", 1)[0].strip(), 16)
        if size == 0:
            while reader.readline(8192) not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(parts)
        total += size
        if total > MAX_BODY_BYTES:
            raise ValueError("request body too large")
        parts.append(reader.read(size))
        reader.readline(8)


def _read_body(handler: _HttpHandler) -> bytes:
    if "chunked" in handler.headers.get("Transfer-Encoding", "").lower():
        return _read_chunked(handler.rfile)
    length = int(handler.headers.get("Content-Length") or 0)
    if not 0 <= length <= MAX_BODY_BYTES:
        raise ValueError(f"unacceptable Content-Length {length}")
    return handler.rfile.read(length)


class HttpSink(_ServerBase):
    """An HTTP/1.1 server that records every request; TLS unless ``server`` is None."""

    def __init__(
        self,
        server: CertFiles | None,
        *,
        client_cafile: Path | None = None,
        require_client_cert: bool = False,
        response: SinkResponse | Responder = SinkResponse(),
    ) -> None:
        context = (
            None
            if server is None
            else server_context(
                server, client_cafile=client_cafile, require_client_cert=require_client_cert
            )
        )
        handler = type("_Handler", (_HttpHandler,), {"sink": self})
        self.requests: Journal[RecordedRequest] = Journal()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._held: set[threading.Event] = set()
        self._stopping = False
        self._responder: Responder = response if callable(response) else lambda _r: response
        self._listener = _Listener(handler, context, Journal(), suppress_ragged_eofs=True)
        self._listener.start()

    @property
    def scheme(self) -> str:
        return "http" if self._listener.context is None else "https"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{HOST}:{self.port}"

    def respond_with(self, response: SinkResponse | Responder) -> None:
        """Change the answer for requests from now on."""
        with self._lock:
            self._responder = response if callable(response) else lambda _r: response

    def _serve(self, handler: _HttpHandler) -> None:
        try:
            body = _read_body(handler)
        except ValueError as exc:
            handler.send_error(400, str(exc))
            return
        with self._lock:
            request_id, responder = next(self._ids), self._responder
        record = RecordedRequest(
            id=request_id,
            method=handler.command,
            path=handler.path,
            http_version=handler.request_version,
            headers=tuple(handler.headers.items()),
            body=body,
            tls=_session(handler.connection, handler.client_address),
            peer=handler.client_address,
        )
        self.requests.append(record)  # before answering: a client that got a reply sees it
        self._respond(handler, record, responder(record))

    def _respond(
        self, handler: _HttpHandler, record: RecordedRequest, answer: SinkResponse
    ) -> None:
        handler.send_response(answer.status)
        for name, value in answer.headers:
            handler.send_header(name, value)
        if answer.stream_bytes is not None:
            handler.send_header("Content-Type", answer.content_type or "application/octet-stream")
            handler.send_header("Transfer-Encoding", "chunked")
            handler.end_headers()
            if record.method != "HEAD":
                self._send_stream(handler, answer)
            return
        if answer.body is None:
            payload = json.dumps(record.echo()).encode()
            content_type = answer.content_type or "application/json"
        else:
            payload, content_type = answer.body, answer.content_type or "application/octet-stream"
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        if record.method != "HEAD":
            handler.wfile.write(payload)

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            for gate in self._held:
                gate.set()
        super().stop()

    def _send_stream(self, handler: _HttpHandler, answer: SinkResponse) -> None:
        assert answer.stream_bytes is not None
        sent = 0
        while sent < answer.stream_bytes:
            size = min(answer.stream_chunk_bytes, answer.stream_bytes - sent)
            chunk = stream_pattern(size, sent)
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            if sent == 0 and (gate := answer.stream_gate) is not None:
                with self._lock:
                    self._held.add(gate)
                    if self._stopping:
                        gate.set()
                gate.wait(IO_TIMEOUT_S)
            sent += len(chunk)
        handler.wfile.write(b"0\r\n\r\n")


# -- raw TLS -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsConnection:
    """One finished connection to a :class:`TlsServer`."""

    session: TlsSession
    received: bytes = field(repr=False)
    # How the client ended its sending side: a TLS close_notify, a bare TCP FIN, or None
    # (reset, timeout, or the server stopping first).
    eof: Eof | None


class _TlsHandler(socketserver.BaseRequestHandler):
    owner: TlsServer  # set on the subclass each server makes

    def handle(self) -> None:
        self.owner._handle(self.request, self.client_address)


class TlsServer(_ServerBase):
    """Raw TLS on 127.0.0.1 presenting ``server``'s chain, whatever it holds; sends nothing."""

    def __init__(
        self,
        server: CertFiles,
        *,
        client_cafile: Path | None = None,
        require_client_cert: bool = False,
        minimum_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2,
    ) -> None:
        context = server_context(
            server,
            client_cafile=client_cafile,
            require_client_cert=require_client_cert,
            minimum_version=minimum_version,
        )
        self.sessions: Journal[TlsSession] = Journal()  # at handshake completion
        self.connections: Journal[TlsConnection] = Journal()  # when each connection ends
        handler = type("_Handler", (_TlsHandler,), {"owner": self})
        self._listener = _Listener(handler, context, Journal(), suppress_ragged_eofs=False)
        self._listener.start()

    def _on_data(self, conn: ssl.SSLSocket, data: bytes) -> None:
        """Called for each chunk received; the base server only records it."""

    def _on_eof(self, conn: ssl.SSLSocket) -> None:
        """Called once the client has finished sending, while our side may still write."""

    def _handle(self, conn: ssl.SSLSocket, peer: Peer) -> None:
        session = _session(conn, peer)
        assert session is not None
        self.sessions.append(session)
        received = bytearray()
        eof: Eof | None = None
        try:
            while data := conn.recv(65536):
                received += data
                self._on_data(conn, data)
            eof = "close_notify"
        except ssl.SSLEOFError:
            eof = "tcp_fin"
        except OSError:
            eof = None
        try:
            # OpenSSL 3 answers a bare FIN with a fatal decode_error alert and the session is
            # dead; only a close_notify leaves our side open for _on_eof and a clean close.
            if eof == "close_notify":
                self._on_eof(conn)
                with contextlib.suppress(OSError):
                    conn.unwrap()  # our close_notify, then the TCP FIN on close
        finally:
            self.connections.append(TlsConnection(session, bytes(received), eof))


class TlsEchoServer(TlsServer):
    """A :class:`TlsServer` that echoes every byte; ``after_eof`` answers a close_notify."""

    def __init__(
        self,
        server: CertFiles,
        *,
        client_cafile: Path | None = None,
        require_client_cert: bool = False,
        after_eof: bytes = b"",
    ) -> None:
        self.after_eof = after_eof
        super().__init__(
            server, client_cafile=client_cafile, require_client_cert=require_client_cert
        )

    def _on_data(self, conn: ssl.SSLSocket, data: bytes) -> None:
        conn.sendall(data)

    def _on_eof(self, conn: ssl.SSLSocket) -> None:
        if self.after_eof:
            with contextlib.suppress(OSError):
                conn.sendall(self.after_eof)
