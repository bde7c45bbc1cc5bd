"""mqtt listeners: a device speaks plain MQTT 3.1.1 or 5.0; its broker gets MQTT over verified
TLS with the device's own certificate.

The gateway reads the device's CONNECT (capped, within ``first_packet_timeout_s``), identifies
the device (source address, or the CONNECT username/password against its login credential),
dials its route, and sends the broker a CONNECT that is the device's own except where configured:
a client-id template, an injected username/password, the topic mount on the will. Refusals are a
CONNACK in the device's protocol version: "not authorized" / "bad username or password" for the
device, "server unavailable" when the destination fails. After CONNECT the bytes pass untouched
(QoS 0/1/2, retained, will, keep-alive are the two ends' business), unless a topic mount is
configured: then PUBLISH, SUBSCRIBE and UNSUBSCRIBE topics are rewritten both ways.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace

from fleetgate.config.schema import DestinationConfig
from fleetgate.dataplane import mqtt_codec as mqtt
from fleetgate.dataplane.datapath import Login, Refused, refusal_after_handshake
from fleetgate.dataplane.endpoint import Endpoint
from fleetgate.dataplane.listener import Conn, Relay
from fleetgate.dataplane.policy import Refusal
from fleetgate.errors import InvalidRequest
from fleetgate.logs import bind, get_logger
from fleetgate.records import Device
from fleetgate.templates import Template

log = get_logger("fleetgate.dataplane")
CONNECT = 1
_DEVICE_REFUSALS = {"bad_credentials": mqtt.ConnackCode.BAD_CREDENTIALS}


async def read_connect(conn: Conn, max_packet: int) -> bytes:
    """The device's CONNECT, whole (the rest stays buffered).

    The first byte decides whether this is MQTT at all: a device speaking something else (an
    HTTP request line, say) is refused at once, not after waiting for as many bytes as its
    second byte would declare.
    """
    buffer = b""
    while True:
        if buffer and buffer[0] >> 4 != CONNECT:
            raise Refused("not_mqtt", f"first packet type {buffer[0] >> 4}, not CONNECT")
        found = mqtt.frame(buffer, max_packet)
        if found is not None:
            total, _ = found
            conn.endpoint.unread(buffer[total:])
            return buffer[:total]
        chunk = await conn.endpoint.read_some()
        if not chunk:
            raise Refused("client_closed", "the device closed before sending CONNECT")
        buffer += chunk


def _expand(template: str, device: Device) -> str:
    return Template(template).expand(device.id, device.group, device.attributes)


def _refuse(conn: Conn, level: int, code: mqtt.ConnackCode) -> None:
    conn.endpoint.write(mqtt.encode_connack(level, code))
    conn.endpoint.write_eof()


def _checked(rewrite: Callable[[bytes], bytes]) -> Callable[[bytes], bytes]:
    """A topic rewrite whose refusal ends the splice (as a ValueError) with the reason."""

    def run(data: bytes) -> bytes:
        try:
            return rewrite(data)
        except mqtt.MqttError as exc:
            raise ValueError(f"mqtt_{exc.reason}") from None

    return run


async def _read_connect(conn: Conn) -> tuple[bytes, mqtt.Connect]:
    config = conn.config
    try:
        async with asyncio.timeout(config.first_packet_timeout_s):
            packet = await read_connect(conn, config.max_packet_bytes)
    except TimeoutError:
        raise Refused("first_packet_timeout", "no CONNECT in time") from None
    except mqtt.MqttError as exc:
        raise Refused(f"mqtt_{exc.reason}", str(exc)) from None
    try:
        return packet, mqtt.parse_connect(packet)
    except mqtt.MqttError as exc:
        if exc.reason == "protocol_version":
            _refuse(conn, mqtt.MQTT_311, mqtt.ConnackCode.UNSUPPORTED_VERSION)
        raise Refused(f"mqtt_{exc.reason}", str(exc)) from None


async def _identify(conn: Conn, connect: mqtt.Connect) -> Device:
    by_login = conn.config.identity == "username"
    try:
        if by_login:
            return await conn.path.by_login(conn.config, connect.username, connect.password)
        return await conn.device()
    except Refused as refusal:
        code = _DEVICE_REFUSALS.get(refusal.reason, mqtt.ConnackCode.NOT_AUTHORIZED)
        if by_login and refusal.reason == Refusal.UNKNOWN_DEVICE.value:
            # A login naming no device is answered like a wrong password, so the answer does
            # not tell which device ids exist; the log keeps the real reason.
            code = mqtt.ConnackCode.BAD_CREDENTIALS
        _refuse(conn, connect.level, code)
        raise


def _rewrite(
    conn: Conn,
    connect: mqtt.Connect,
    device: Device,
    destination: DestinationConfig,
    login: Login | None,
    mount: str | None,
) -> mqtt.Connect:
    rewritten = connect
    if destination.client_id:
        try:
            client_id = _expand(destination.client_id, device)
        except InvalidRequest as exc:
            raise Refused("client_id_template", exc.detail) from None
        rewritten = replace(rewritten, client_id=client_id)
    if login is not None:
        rewritten = replace(rewritten, username=login.username, password=login.password)
    elif conn.config.identity == "username":
        # The device's fleetgate login is not the broker's business.
        rewritten = replace(rewritten, username=None, password=None)
    if mount and rewritten.will is not None:
        topic = mqtt.mount_topic(mount, rewritten.will.topic)
        rewritten = replace(rewritten, will=replace(rewritten.will, topic=topic))
    return rewritten


def _mount(
    conn: Conn, device: Device, destination: DestinationConfig, connect: mqtt.Connect
) -> tuple[str | None, mqtt.TopicMount | None]:
    """The device's topic prefix and its rewriter; a prefix that cannot be (an attribute with
    a wildcard, say) refuses the device rather than mixing its topics with another's."""
    if not destination.topic_mount:
        return None, None
    try:
        mount = _expand(destination.topic_mount, device)
        topics = mqtt.TopicMount(connect.level, mount, conn.config.max_packet_bytes)
        if connect.will is not None:
            mqtt.mount_topic(mount, connect.will.topic)
    except (ValueError, InvalidRequest, mqtt.MqttError) as exc:
        raise Refused("topic_mount", str(exc)) from None
    return mount, topics


async def _broker_answers(upstream: Endpoint, destination: DestinationConfig) -> None:
    """Wait for the broker's first bytes (its CONNACK, left buffered for the relay). A broker
    that refuses fleetgate's certificate after the handshake, closes, or stays silent is the
    device's "server unavailable", with the precise cause in the log."""
    try:
        async with asyncio.timeout(destination.response_timeout_s):
            data = await upstream.read_some()
    except TimeoutError:
        raise Refused(
            "response_timeout",
            f"no CONNACK within {destination.response_timeout_s} s",
            upstream=True,
        ) from None
    if not data:
        raise refusal_after_handshake(upstream) or Refused(
            "destination_closed", "the broker closed before its CONNACK", upstream=True
        )
    upstream.unread(data)


async def serve_mqtt(conn: Conn) -> Relay:
    packet, connect = await _read_connect(conn)
    device = await _identify(conn, connect)
    try:
        conn.identified(device.id)
    except Refused:  # the device holds as many connections as it may
        _refuse(conn, connect.level, mqtt.ConnackCode.SERVER_UNAVAILABLE)
        raise
    with bind(device=device.id):
        try:
            route = await conn.path.route(conn.listener, conn.config, device)
            destination = route.destination
            mount, topics = _mount(conn, device, destination, connect)
            login = await conn.path.login(device, destination)
            rewritten = _rewrite(conn, connect, device, destination, login, mount)
            upstream = await conn.path.dial(device, route)
        except Refused:
            _refuse(conn, connect.level, mqtt.ConnackCode.SERVER_UNAVAILABLE)
            raise
        try:
            upstream.write(packet if rewritten == connect else mqtt.encode_connect(rewritten))
            try:
                await _broker_answers(upstream, destination)
            except Refused:
                _refuse(conn, connect.level, mqtt.ConnackCode.SERVER_UNAVAILABLE)
                raise
            conn.connected(
                route.name,
                mqtt_level=connect.level,
                client_id=rewritten.client_id,
            )
            up = down = None
            if topics is not None:
                up, down = _checked(topics.outbound), _checked(topics.inbound)
        except BaseException:
            upstream.close()
            raise
        return Relay(upstream, up, down)
