"""http listeners: a device speaks plain HTTP/1.1; its destination gets HTTPS with the device's
own certificate, identity headers and a signature.

Per request: the device is identified (source address, or HTTP basic auth against its login
credential), the body is read up to ``max_body_bytes`` (the signature covers its digest), any
``X-Fleetgate-*`` header the device sent is dropped (it cannot claim another identity), and the
request goes out on a pooled connection of this device's own. The response streams back as it
arrives. Keep-alive on both sides. Refusals: 401 (login), 403 (unknown or disabled device),
413 (body), 502 with a JSON reason when the destination fails.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json

import h11

from fleetgate.config.schema import ListenerConfig
from fleetgate.dataplane.datapath import DataPath, Refused, Route
from fleetgate.dataplane.http_upstream import HttpUpstream, next_event, strip_hop_by_hop
from fleetgate.dataplane.listener import Conn, Handler
from fleetgate.dataplane.policy import Refusal
from fleetgate.dataplane.signing import signature_headers
from fleetgate.logs import bind, get_logger
from fleetgate.pki.records import CredentialKind
from fleetgate.records import Device

log = get_logger("fleetgate.dataplane")
# After a refusal, how long and how much of the device's unread request is drained.
LINGER_S = 2.0
LINGER_MAX_BYTES = 8 * 1024 * 1024
_LOGIN_FAILURES = frozenset({"bad_credentials", Refusal.UNKNOWN_DEVICE.value})
_BAD_LOGIN = ("bad_credentials", "wrong username or password")
_STATUS_FOR = {
    "bad_credentials": 401,
    Refusal.UNKNOWN_DEVICE.value: 403,
    Refusal.DEVICE_DISABLED.value: 403,
}


class HttpRefusal(Exception):
    """A refusal answered with ``status``; the device is told ``answer`` (error, detail), which
    is the logged reason unless that would tell the device more than it may know."""

    def __init__(
        self, status: int, refused: Refused, answer: tuple[str, str] | None = None
    ) -> None:
        super().__init__(refused.reason)
        self.status = status
        self.refused = refused
        self.answer = answer or (refused.reason, refused.detail)


def _basic(headers: list[tuple[bytes, bytes]]) -> tuple[str | None, bytes | None]:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() != b"basic":
                return None, None
            try:
                username, _, password = base64.b64decode(token, validate=True).partition(b":")
            except (binascii.Error, ValueError):
                return None, None
            return username.decode("utf-8", "replace"), password
    return None, None


def _problem(status: int, reason: str, detail: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
    body = json.dumps({"error": reason, "detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b'Basic realm="fleetgate"'))
    return headers, body


async def _answer(conn: Conn, http: h11.Connection, status: int, reason: str, detail: str) -> bool:
    """Send a refusal if a response can still start; whether it was sent."""
    headers, body = _problem(status, reason, detail)
    if http.our_state is not h11.SEND_RESPONSE:
        return False  # too late for a clean answer: the connection just closes
    conn.endpoint.write(http.send(h11.Response(status_code=status, headers=headers)) or b"")
    conn.endpoint.write(http.send(h11.Data(data=body)) or b"")
    conn.endpoint.write(http.send(h11.EndOfMessage()) or b"")
    return True


async def _linger(conn: Conn) -> None:
    """Close after a refusal without losing it (RFC 9112 section 9.6): the device may still be
    sending the body we refused, and closing a socket with unread bytes makes the kernel send
    a reset that can destroy the answer before the device reads it. So: half-close, then read
    and discard until the device closes too, for a bounded time and number of bytes."""
    conn.endpoint.write_eof()
    discarded = 0
    try:
        async with asyncio.timeout(LINGER_S):
            while discarded <= LINGER_MAX_BYTES:
                data = await conn.endpoint.read_some()
                if not data:
                    return
                discarded += len(data)
    except (TimeoutError, ConnectionError):
        return


async def build_request(
    path: DataPath,
    route: Route,
    listener: ListenerConfig,
    source: str,
    device: Device,
    request: h11.Request,
    body: bytes,
) -> h11.Request:
    """The request as the destination gets it: identity headers, login, signature.

    The device's own ``Authorization`` goes through only when fleetgate neither read it (the
    device's login on a ``username`` listener) nor replaces it (``login_credential``): a
    request carries one Authorization header, never the device's next to the injected one.
    ``X-Forwarded-For`` is fleetgate's alone: the device is the first hop, and a value it
    wrote itself would stand in front of the address fleetgate vouches for.
    """
    destination = route.destination
    login = await path.login(device, destination)
    own_authorization = listener.identity != "username" and login is None
    headers = [
        (n, v)
        for n, v in strip_hop_by_hop(list(request.headers))
        if not n.startswith(b"x-fleetgate-")
        and n not in (b"host", b"content-length", b"x-forwarded-for")
        and (n != b"authorization" or own_authorization)
    ]
    host = destination.server_name or destination.address.rpartition(":")[0]
    headers.insert(0, (b"host", host.encode()))
    headers.append((b"x-forwarded-for", source.encode()))
    headers.append((b"x-fleetgate-device", device.id.encode()))
    headers.append((b"x-fleetgate-group", device.group.encode()))
    for attribute in destination.identity_headers:
        if attribute in device.attributes:
            name = f"x-fleetgate-attr-{attribute.replace('_', '-')}"
            headers.append((name.encode(), device.attributes[attribute].encode()))
    if login is not None:
        token = base64.b64encode(login.username.encode() + b":" + login.password)
        headers.append((b"authorization", b"Basic " + token))
    if destination.signing_credential is not None:
        material = await path.material(
            device, destination.signing_credential, None, CredentialKind.HMAC
        )
        assert material is not None
        assert material.secret is not None
        signed = signature_headers(
            material.secret.reveal(),
            str(material.credential.public.get("key_id", material.credential.id)),
            method=request.method.decode(),
            target=request.target.decode(),
            body=body,
            device_id=device.id,
            timestamp=int(path.clock.now().timestamp()),
        )
        headers.extend((name.lower().encode(), value.encode()) for name, value in signed)
    headers.append((b"content-length", str(len(body)).encode()))
    return h11.Request(method=request.method, target=request.target, headers=headers)


class HttpProxy:
    """One device connection: requests in order (HTTP/1.1 without pipelining surprises)."""

    def __init__(self, conn: Conn, upstream: HttpUpstream) -> None:
        self.conn = conn
        self.upstream = upstream
        self.http = h11.Connection(h11.SERVER, conn.config.max_header_bytes)
        self.device: Device | None = None
        self.route: Route | None = None

    async def _identify(self, request: h11.Request) -> Device:
        conn = self.conn
        try:
            if conn.config.identity == "username":
                username, password = _basic(list(request.headers))
                device = await conn.path.by_login(conn.config, username, password)
            elif self.device is not None:
                return self.device
            else:
                device = await conn.device()
        except Refused as exc:
            if conn.config.identity == "username" and exc.reason in _LOGIN_FAILURES:
                # One answer for a wrong password and for a name that is no device's: the
                # device must not learn which ids exist. The log keeps the precise reason.
                raise HttpRefusal(401, exc, _BAD_LOGIN) from None
            raise HttpRefusal(_STATUS_FOR.get(exc.reason, 403), exc) from None
        if self.device is None:
            try:
                conn.identified(device.id)
            except Refused as exc:  # the device holds as many connections as it may
                raise HttpRefusal(429, exc) from None
        elif device.id != self.device.id:
            raise HttpRefusal(403, Refused("identity_changed", "one connection, one device"))
        self.device = device
        return device

    async def _read_body(self, request: h11.Request) -> bytes:
        limit = self.conn.config.max_body_bytes
        for name, value in request.headers:
            if name == b"content-length" and int(value) > limit:
                raise HttpRefusal(413, Refused("body_too_large", f"more than {limit} bytes"))
        if self.http.they_are_waiting_for_100_continue:
            self.conn.endpoint.write(
                self.http.send(h11.InformationalResponse(status_code=100, headers=[])) or b""
            )
        body = bytearray()
        while True:
            event = await next_event(self.http, self.conn.endpoint)
            if isinstance(event, h11.Data):
                body += event.data
                if len(body) > limit:
                    raise HttpRefusal(413, Refused("body_too_large", f"more than {limit} bytes"))
            elif isinstance(event, h11.EndOfMessage):
                return bytes(body)
            else:
                raise ConnectionError("the device closed in the middle of a request")

    async def _one(self, request: h11.Request) -> None:
        conn = self.conn
        device = await self._identify(request)
        body = await self._read_body(request)
        with bind(device=device.id):
            try:
                self.route = await conn.path.route(conn.listener, conn.config, device)
                outgoing = await build_request(
                    conn.path, self.route, conn.config, conn.source, device, request, body
                )
                response = await self.upstream.exchange(device, self.route, outgoing, body)
            except Refused as exc:
                status = 403 if exc.reason in _STATUS_FOR else 502
                raise HttpRefusal(status, exc) from None
            try:
                headers = strip_hop_by_hop(response.headers)
                conn.endpoint.write(
                    self.http.send(
                        h11.Response(
                            status_code=response.status, headers=headers, reason=response.reason
                        )
                    )
                    or b""
                )
                async for chunk in response.body(self.route.destination.response_timeout_s):
                    conn.endpoint.write(self.http.send(h11.Data(data=chunk)) or b"")
                    await conn.endpoint.drain()
                conn.endpoint.write(self.http.send(h11.EndOfMessage()) or b"")
            finally:
                response.release()
            conn.path.metrics.listener_connections.labels(conn.listener, "relayed").inc()
            log.info(
                "http.forwarded",
                method=request.method.decode(),
                status=response.status,
                destination=self.route.name,
                up_bytes=len(body),
            )

    async def serve(self) -> None:
        conn = self.conn
        first = True
        while True:
            timeout = conn.config.first_packet_timeout_s if first else conn.config.idle_timeout_s
            try:
                async with asyncio.timeout(timeout):
                    event = await next_event(self.http, conn.endpoint)
            except TimeoutError:
                if first:
                    raise Refused("first_packet_timeout", "no request in time") from None
                return
            except h11.RemoteProtocolError as exc:
                await _answer(conn, self.http, exc.error_status_hint, "bad_request", str(exc))
                raise Refused("not_http", str(exc)) from None
            if isinstance(event, h11.ConnectionClosed):
                return
            assert isinstance(event, h11.Request)
            first = False
            try:
                await self._one(event)
            except HttpRefusal as exc:
                if await _answer(conn, self.http, exc.status, *exc.answer):
                    await _linger(conn)
                raise exc.refused from None
            if self.http.our_state is h11.MUST_CLOSE or self.http.their_state is h11.MUST_CLOSE:
                conn.endpoint.write_eof()
                return
            self.http.start_next_cycle()


def make_http_handler(upstream: HttpUpstream) -> Handler:
    async def serve_http(conn: Conn) -> None:
        await HttpProxy(conn, upstream).serve()

    return serve_http
