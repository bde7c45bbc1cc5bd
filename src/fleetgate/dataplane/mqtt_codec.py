"""MQTT 3.1, 3.1.1 and 5.0 on the data path: framing, CONNECT/CONNACK and topic mounts.

Pure: bytes in, bytes out, no I/O. Every length read from the wire is checked against the bytes
actually present and against the caller's ``max_packet``. :class:`MqttError` means the peer sent
something we will not pass on (the peer is wrong); ``ValueError`` from an encoder or constructor
means the caller asked for something MQTT cannot express (we are wrong).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from fleetgate.errors import FleetgateError

MQTT_31 = 3  # protocol name "MQIsdp"; answered with the 3.1.1 CONNACK codes
MQTT_311 = 4
MQTT_5 = 5
MAX_REMAINING_LENGTH = 268_435_455  # the largest four-byte variable byte integer
_MAX_U16 = 0xFFFF
_PROTOCOL_NAMES = {MQTT_31: "MQIsdp", MQTT_311: "MQTT", MQTT_5: "MQTT"}

_CONNECT, _CONNACK, _PUBLISH, _SUBSCRIBE, _UNSUBSCRIBE = 1, 2, 3, 8, 10

type _Buffer = bytes | bytearray | memoryview
type _Chunk = bytes | memoryview


class MqttError(FleetgateError):
    """The peer's bytes break MQTT or the gateway's topic rules; ``reason`` is a stable slug.

    Slugs: ``malformed``, ``protocol_error``, ``packet_too_large``, ``protocol_name``,
    ``protocol_version``, ``not_connect``, ``not_connack``, ``invalid_topic``,
    ``forbidden_topic``, ``topic_too_long``. Details never quote peer-supplied text.
    """

    reason: str

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# --- variable byte integers and framing -------------------------------------------------------


def remaining_length(n: int) -> bytes:
    """The variable byte integer for ``n`` (1 to 4 bytes, least significant group first)."""
    if not 0 <= n <= MAX_REMAINING_LENGTH:
        raise ValueError(f"{n} cannot be encoded as a variable byte integer")
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _decode_varint(buf: _Buffer, pos: int, end: int) -> tuple[int, int] | None:
    """(value, position after it), or None when ``end`` comes first."""
    value = 0
    for i in range(4):
        if pos + i >= end:
            return None
        byte = buf[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            # 5.0 requires the shortest encoding [MQTT-1.5.5-1]; 3.1.1 defines only those ranges.
            if byte == 0 and i:
                raise MqttError("malformed", "variable byte integer is not minimally encoded")
            return value, pos + i + 1
    raise MqttError("malformed", "variable byte integer longer than 4 bytes")


def _frame_header(buf: _Buffer, pos: int, end: int, max_packet: int) -> tuple[int, int] | None:
    decoded = _decode_varint(buf, pos + 1, end)
    if decoded is None:
        return None
    length, body_start = decoded
    header_len = body_start - pos
    total = header_len + length
    if total > max_packet:
        raise MqttError("packet_too_large", f"{total} bytes declared, limit {max_packet}")
    return total, header_len


def frame(buf: _Buffer, max_packet: int) -> tuple[int, int] | None:
    """(total length incl. fixed header, fixed header length) of the first packet, or None.

    None means more bytes are needed. A packet declaring more than ``max_packet`` bytes is
    refused as soon as its fixed header is complete, before any of its body arrives.
    """
    header = _frame_header(buf, 0, len(buf), max_packet)
    if header is None or header[0] > len(buf):
        return None
    return header


# --- field readers and properties -------------------------------------------------------------


def _decode_str(raw: memoryview) -> str:
    try:
        text = str(raw, "utf-8")
    except UnicodeDecodeError as exc:  # also rejects encoded surrogates [MQTT-1.5.4-1]
        raise MqttError("malformed", "string is not well-formed UTF-8") from exc
    if "\x00" in text:
        raise MqttError("malformed", "string contains U+0000")
    return text


class _Reader:
    """Reads fields from ``buf[pos:end]``; running past ``end`` is a malformed packet."""

    __slots__ = ("_buf", "_end", "pos")

    def __init__(self, buf: memoryview, pos: int, end: int) -> None:
        self._buf = buf
        self.pos = pos
        self._end = end

    @property
    def remaining(self) -> int:
        return self._end - self.pos

    def take(self, n: int) -> memoryview:
        start = self.pos
        if start + n > self._end:
            raise MqttError("malformed", "a field runs past the end of the packet")
        self.pos = start + n
        return self._buf[start : self.pos]

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        raw = self.take(2)
        return raw[0] << 8 | raw[1]

    def u32(self) -> int:
        return int.from_bytes(self.take(4))

    def varint(self) -> int:
        decoded = _decode_varint(self._buf, self.pos, self._end)
        if decoded is None:
            raise MqttError("malformed", "a variable byte integer runs past the end")
        value, self.pos = decoded
        return value

    def string(self) -> str:
        return _decode_str(self.take(self.u16()))

    def binary(self) -> bytes:
        return bytes(self.take(self.u16()))

    def properties(self, allowed: frozenset[int]) -> tuple[memoryview, dict[int, int]]:
        raw = self.take(self.varint())
        return raw, _check_properties(raw, allowed)


class _Kind(enum.Enum):
    BYTE = enum.auto()
    U16 = enum.auto()
    U32 = enum.auto()
    VARINT = enum.auto()
    STRING = enum.auto()
    BINARY = enum.auto()
    PAIR = enum.auto()


# MQTT 5.0 section 2.2.2.2: every property identifier and the type of its value.
_PROPERTY_KINDS = {
    0x01: _Kind.BYTE, 0x02: _Kind.U32, 0x03: _Kind.STRING, 0x08: _Kind.STRING,
    0x09: _Kind.BINARY, 0x0B: _Kind.VARINT, 0x11: _Kind.U32, 0x12: _Kind.STRING,
    0x13: _Kind.U16, 0x15: _Kind.STRING, 0x16: _Kind.BINARY, 0x17: _Kind.BYTE,
    0x18: _Kind.U32, 0x19: _Kind.BYTE, 0x1A: _Kind.STRING, 0x1C: _Kind.STRING,
    0x1F: _Kind.STRING, 0x21: _Kind.U16, 0x22: _Kind.U16, 0x23: _Kind.U16,
    0x24: _Kind.BYTE, 0x25: _Kind.BYTE, 0x26: _Kind.PAIR, 0x27: _Kind.U32,
    0x28: _Kind.BYTE, 0x29: _Kind.BYTE, 0x2A: _Kind.BYTE,
}  # fmt: skip
_USER_PROPERTY, _TOPIC_ALIAS = 0x26, 0x23
_CONNECT_PROPERTIES = frozenset({0x11, 0x21, 0x27, 0x22, 0x19, 0x17, 0x26, 0x15, 0x16})
_WILL_PROPERTIES = frozenset({0x18, 0x01, 0x02, 0x03, 0x08, 0x09, 0x26})
_CONNACK_PROPERTIES = frozenset(
    {0x11, 0x21, 0x24, 0x25, 0x27, 0x12, 0x22, 0x1F, 0x26, 0x28, 0x29, 0x2A, 0x13, 0x1A, 0x1C}
    | {0x15, 0x16}
)
# A client's PUBLISH carries no Subscription Identifier [MQTT-3.3.4-6].
_CLIENT_PUBLISH_PROPERTIES = frozenset({0x01, 0x02, 0x23, 0x08, 0x09, 0x26, 0x03})
_SUBSCRIBE_PROPERTIES = frozenset({0x0B, 0x26})
_UNSUBSCRIBE_PROPERTIES = frozenset({0x26})


def _check_properties(raw: memoryview, allowed: frozenset[int]) -> dict[int, int]:
    """Validate a property list's structure; returns its integer-valued properties."""
    reader = _Reader(raw, 0, len(raw))
    numbers: dict[int, int] = {}
    seen: set[int] = set()
    while reader.remaining:
        ident = reader.varint()
        kind = _PROPERTY_KINDS.get(ident)
        if kind is None or ident not in allowed:
            raise MqttError("malformed", f"property 0x{ident:02x} is not valid here")
        # Only User Property may repeat in the packets read here (not a broker's PUBLISH).
        if ident in seen and ident != _USER_PROPERTY:
            raise MqttError("protocol_error", f"property 0x{ident:02x} appears twice")
        seen.add(ident)
        match kind:
            case _Kind.BYTE:
                numbers[ident] = reader.u8()
            case _Kind.U16:
                numbers[ident] = reader.u16()
            case _Kind.U32:
                numbers[ident] = reader.u32()
            case _Kind.VARINT:
                numbers[ident] = reader.varint()
            case _Kind.STRING:
                reader.string()
            case _Kind.BINARY:
                reader.binary()
            case _Kind.PAIR:
                reader.string()
                reader.string()
    return numbers


def _open_packet(packet: _Buffer, kind: int, wrong_kind: str) -> _Reader:
    """A reader over the body of one whole packet of ``kind`` whose fixed header flags are 0."""
    view = memoryview(packet)
    if not view:
        raise MqttError("malformed", "empty packet")
    if view[0] >> 4 != kind:
        raise MqttError(wrong_kind, f"packet type {view[0] >> 4}")
    if view[0] & 0x0F:
        raise MqttError("malformed", "reserved fixed header flags are set")
    decoded = _decode_varint(view, 1, len(view))
    if decoded is None or decoded[0] + decoded[1] != len(view):
        raise MqttError("malformed", "remaining length does not match the packet")
    return _Reader(view, decoded[1], len(view))


# --- CONNECT ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: bytes = b""  # raw 5.0 will properties without their length; b"" before 5.0


@dataclass(frozen=True)
class Connect:
    level: int
    protocol_name: str
    clean_start: bool
    keep_alive: int
    client_id: str
    username: str | None
    password: bytes | None = field(repr=False)
    will: Will | None
    properties: bytes = b""  # raw 5.0 CONNECT properties without their length; b"" before 5.0


def _is_topic_name(topic: str) -> bool:
    return bool(topic) and "+" not in topic and "#" not in topic and "\x00" not in topic


def parse_connect(packet: bytes) -> Connect:
    """Decode one whole CONNECT packet (fixed header included), validating it strictly."""
    reader = _open_packet(packet, _CONNECT, "not_connect")
    name = reader.string()
    level = reader.u8()
    if name not in _PROTOCOL_NAMES.values():
        raise MqttError("protocol_name", "not MQTT or MQIsdp")
    if _PROTOCOL_NAMES.get(level) != name:
        raise MqttError("protocol_version", f"level {level} with protocol name {name}")
    v5 = level == MQTT_5
    flags = reader.u8()
    will_flag, will_qos, will_retain = bool(flags & 0x04), (flags >> 3) & 3, bool(flags & 0x20)
    has_username, has_password = bool(flags & 0x80), bool(flags & 0x40)
    if flags & 0x01:
        raise MqttError("malformed", "reserved connect flag is set")
    if will_qos == 3 or (not will_flag and (will_qos or will_retain)):
        raise MqttError("malformed", "will QoS/retain flags are inconsistent")
    if has_password and not has_username and not v5:
        raise MqttError("malformed", "password without user name before MQTT 5.0")
    keep_alive = reader.u16()
    properties = bytes(reader.properties(_CONNECT_PROPERTIES)[0]) if v5 else b""
    client_id = reader.string()
    will = None
    if will_flag:
        will_properties = bytes(reader.properties(_WILL_PROPERTIES)[0]) if v5 else b""
        topic = reader.string()
        if not _is_topic_name(topic):
            raise MqttError("invalid_topic", "will topic is empty or has wildcards")
        will = Will(topic, reader.binary(), will_qos, will_retain, will_properties)
    username = reader.string() if has_username else None
    password = reader.binary() if has_password else None
    if reader.remaining:
        raise MqttError("malformed", "bytes after the CONNECT payload")
    return Connect(
        level, name, bool(flags & 0x02), keep_alive, client_id, username, password, will, properties
    )


def _check_level(level: int) -> None:
    if level not in _PROTOCOL_NAMES:
        raise ValueError(f"unsupported MQTT protocol level {level}")


def _encode_str(text: str) -> bytes:
    try:
        raw = text.encode()
    except UnicodeEncodeError as exc:
        raise ValueError("string is not encodable as UTF-8") from exc
    if "\x00" in text:
        raise ValueError("MQTT strings cannot contain U+0000")
    return _encode_bin(raw)


def _encode_bin(raw: bytes) -> bytes:
    if len(raw) > _MAX_U16:
        raise ValueError(f"field of {len(raw)} bytes exceeds 65535")
    return len(raw).to_bytes(2) + raw


def _encode_properties(raw: bytes, allowed: frozenset[int]) -> bytes:
    try:
        _check_properties(memoryview(raw), allowed)
    except MqttError as exc:
        raise ValueError(f"invalid properties: {exc}") from exc
    return remaining_length(len(raw)) + raw


def _packet(first: int, parts: list[bytes]) -> bytes:
    body = b"".join(parts)
    return bytes((first,)) + remaining_length(len(body)) + body


def encode_connect(c: Connect) -> bytes:
    """The CONNECT packet for ``c``; ValueError when MQTT at ``c.level`` cannot express it."""
    _check_level(c.level)
    v5 = c.level == MQTT_5
    if c.protocol_name != _PROTOCOL_NAMES[c.level]:
        raise ValueError(f"protocol level {c.level} goes with {_PROTOCOL_NAMES[c.level]!r}")
    if not 0 <= c.keep_alive <= _MAX_U16:
        raise ValueError("keep_alive must fit in two bytes")
    if c.password is not None and c.username is None and not v5:
        raise ValueError("a password needs a user name before MQTT 5.0")
    if (c.properties or (c.will and c.will.properties)) and not v5:
        raise ValueError("properties exist only in MQTT 5.0")
    flags = (
        (0x80 if c.username is not None else 0)
        | (0x40 if c.password is not None else 0)
        | (0x02 if c.clean_start else 0)
    )
    if c.will is not None:
        if c.will.qos not in {0, 1, 2}:
            raise ValueError("will QoS must be 0, 1 or 2")
        if not _is_topic_name(c.will.topic):
            raise ValueError("will topic must be non-empty and without wildcards")
        flags |= 0x04 | c.will.qos << 3 | (0x20 if c.will.retain else 0)
    parts = [_encode_str(c.protocol_name), bytes((c.level, flags)), c.keep_alive.to_bytes(2)]
    if v5:
        parts.append(_encode_properties(c.properties, _CONNECT_PROPERTIES))
    parts.append(_encode_str(c.client_id))
    if c.will is not None:
        if v5:
            parts.append(_encode_properties(c.will.properties, _WILL_PROPERTIES))
        parts += [_encode_str(c.will.topic), _encode_bin(c.will.payload)]
    if c.username is not None:
        parts.append(_encode_str(c.username))
    if c.password is not None:
        parts.append(_encode_bin(c.password))
    return _packet(_CONNECT << 4, parts)


# --- CONNACK ------------------------------------------------------------------------------------


class ConnackCode(enum.Enum):
    ACCEPTED = "accepted"
    NOT_AUTHORIZED = "not_authorized"
    SERVER_UNAVAILABLE = "server_unavailable"
    BAD_CREDENTIALS = "bad_credentials"
    IDENTIFIER_REJECTED = "identifier_rejected"
    PACKET_TOO_LARGE = "packet_too_large"
    UNSUPPORTED_VERSION = "unsupported_version"


# 3.1.1 has no "packet too large": the limit is this server's resource, not the client's
# identity or credentials, so it is answered as 0x03 "server unavailable".
_CONNACK_311 = {
    ConnackCode.ACCEPTED: 0x00,
    ConnackCode.UNSUPPORTED_VERSION: 0x01,
    ConnackCode.IDENTIFIER_REJECTED: 0x02,
    ConnackCode.SERVER_UNAVAILABLE: 0x03,
    ConnackCode.BAD_CREDENTIALS: 0x04,
    ConnackCode.NOT_AUTHORIZED: 0x05,
    ConnackCode.PACKET_TOO_LARGE: 0x03,
}
_CONNACK_5 = {
    ConnackCode.ACCEPTED: 0x00,
    ConnackCode.UNSUPPORTED_VERSION: 0x84,
    ConnackCode.IDENTIFIER_REJECTED: 0x85,
    ConnackCode.BAD_CREDENTIALS: 0x86,
    ConnackCode.NOT_AUTHORIZED: 0x87,
    ConnackCode.SERVER_UNAVAILABLE: 0x88,
    ConnackCode.PACKET_TOO_LARGE: 0x95,
}
# MQTT 5.0 section 3.2.2.2: the reason codes a CONNACK may carry.
_CONNACK_5_VALID = frozenset(
    {0x00, *range(0x80, 0x8B), 0x8C, 0x90, 0x95, 0x97, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F}
)


def encode_connack(level: int, code: ConnackCode, session_present: bool = False) -> bytes:
    """The CONNACK for ``code`` at ``level``; 5.0 answers carry no properties."""
    _check_level(level)
    if session_present and code is not ConnackCode.ACCEPTED:
        raise ValueError("a refused connection has no session [MQTT-3.2.2-4]")
    if level == MQTT_5:
        return bytes((_CONNACK << 4, 3, int(session_present), _CONNACK_5[code], 0))
    return bytes((_CONNACK << 4, 2, int(session_present), _CONNACK_311[code]))


def parse_connack(packet: bytes, level: int) -> tuple[bool, int]:
    """(session present, return/reason code) of one whole CONNACK from the broker."""
    _check_level(level)
    reader = _open_packet(packet, _CONNACK, "not_connack")
    ack_flags = reader.u8()
    code = reader.u8()
    if level == MQTT_5:
        reader.properties(_CONNACK_PROPERTIES)
    if reader.remaining or ack_flags & 0xFE:
        raise MqttError("malformed", "CONNACK has reserved bits or extra bytes")
    if code not in (_CONNACK_5_VALID if level == MQTT_5 else range(6)):
        raise MqttError("malformed", f"unknown CONNACK code 0x{code:02x}")
    if ack_flags and code:
        raise MqttError("malformed", "session present on a refused connection")
    return bool(ack_flags), code


# --- topic mounts -------------------------------------------------------------------------------


def _check_device_topic(topic: str) -> None:
    if not _is_topic_name(topic):
        raise MqttError("invalid_topic", "topic name is empty or has wildcards")
    if topic.startswith("$"):
        raise MqttError("forbidden_topic", "a mounted device cannot use $ topics")


def mount_topic(prefix: str, topic: str) -> str:
    """The broker-side name of a device's topic (a PUBLISH or will topic)."""
    _check_device_topic(topic)
    return prefix + topic


def mount_filter(prefix: str, topic_filter: str) -> str:
    """The broker-side topic filter; ``$share/NAME/f`` keeps its share and mounts ``f``."""
    if not topic_filter:
        raise MqttError("invalid_topic", "empty topic filter")
    if topic_filter.startswith("$share/"):
        name, slash, rest = topic_filter[7:].partition("/")
        if not (name and slash and rest) or "+" in name or "#" in name:
            raise MqttError("invalid_topic", "shared subscription needs $share/NAME/filter")
        return f"$share/{name}/{mount_filter(prefix, rest)}"
    if topic_filter.startswith("$"):
        raise MqttError("forbidden_topic", "a mounted device cannot use $ topics")
    return prefix + topic_filter


def _topic_end(body: memoryview) -> int:
    """Where a PUBLISH's topic name ends within its body (after the 2-byte length and topic)."""
    if len(body) < 2:
        raise MqttError("malformed", "PUBLISH without a topic")
    end = 2 + (body[0] << 8 | body[1])
    if end > len(body):
        raise MqttError("malformed", "PUBLISH topic runs past the packet")
    return end


def _publish(
    first: int, topic_len: int, topic_parts: list[_Chunk], rest: memoryview
) -> list[_Chunk]:
    if topic_len > _MAX_U16:
        raise MqttError("topic_too_long", f"mounted topic would be {topic_len} bytes")
    length = 2 + topic_len + len(rest)
    if length > MAX_REMAINING_LENGTH:
        raise MqttError("packet_too_large", "mounted PUBLISH exceeds the MQTT maximum")
    return [bytes((first,)) + remaining_length(length) + topic_len.to_bytes(2), *topic_parts, rest]


type _Rewrite = Callable[[int, memoryview], list[_Chunk] | None]


class _PacketStream:
    """Frames one direction of a connection and rewrites the packets of interest.

    Invariant: ``_pending`` holds only the start of one packet, so it stays below
    ``max_packet`` (a longer declaration is refused from its fixed header). After an
    MqttError the stream is dead: every later feed raises the same reason.
    """

    def __init__(self, max_packet: int, kinds: frozenset[int], rewrite: _Rewrite) -> None:
        self._max_packet = max_packet
        self._kinds = kinds
        self._rewrite = rewrite
        self._pending = bytearray()
        self._need = 0  # bytes _pending must reach before framing is worth retrying
        self._failed: MqttError | None = None

    def feed(self, data: bytes) -> bytes:
        if self._failed is not None:
            raise MqttError(self._failed.reason, "stream already failed")
        try:
            return self._feed(data)
        except MqttError as exc:
            self._failed = exc
            raise

    def _feed(self, data: bytes) -> bytes:
        if self._pending:
            self._pending += data
            if len(self._pending) < self._need:
                return b""
            buf = bytes(self._pending)
        else:
            buf = bytes(data)
        view = memoryview(buf)
        out: list[_Chunk] = []
        pos = run_start = 0
        end = len(buf)
        self._need = 0
        while pos < end:
            header = _frame_header(buf, pos, end, self._max_packet)
            if header is None:
                self._need = end - pos + 1
                break
            total, header_len = header
            if pos + total > end:
                self._need = total
                break
            if buf[pos] >> 4 in self._kinds:
                rewritten = self._rewrite(buf[pos], view[pos + header_len : pos + total])
                if rewritten is not None:
                    out.append(view[run_start:pos])
                    out.extend(rewritten)
                    run_start = pos + total
            pos += total
        self._pending = bytearray(view[pos:])
        if run_start == 0 and pos == end:
            return buf  # nothing rewritten: pass the caller's bytes on without copying
        out.append(view[run_start:pos])
        return b"".join(out)


class TopicMount:
    """Rewrites topics for one connection so the device lives under ``prefix`` on the broker.

    Fed the device's stream after its CONNECT (``outbound``) and the broker's stream after
    its CONNACK (``inbound``); returns the bytes of every complete packet, rewritten, and
    keeps an incomplete tail. Packets other than PUBLISH, SUBSCRIBE and UNSUBSCRIBE pass
    byte-identical; a second CONNECT from the device is refused.
    """

    def __init__(self, level: int, prefix: str, max_packet: int) -> None:
        _check_level(level)
        # The trailing "/" keeps "devices/d1" from reaching "devices/d10/..." via topic "0/...".
        if not prefix.endswith("/") or prefix.startswith("$") or not _is_topic_name(prefix):
            raise ValueError("prefix must end with '/', not start with '$', have no wildcards")
        if max_packet < 2:
            raise ValueError("max_packet must be at least 2")
        self.level = level
        self.prefix = prefix
        self._prefix_bytes = _encode_str(prefix)[2:]
        self._v5 = level == MQTT_5
        outbound_kinds = frozenset({_CONNECT, _PUBLISH, _SUBSCRIBE, _UNSUBSCRIBE})
        self._out = _PacketStream(max_packet, outbound_kinds, self._rewrite_outbound)
        self._in = _PacketStream(max_packet, frozenset({_PUBLISH}), self._rewrite_inbound)

    def outbound(self, data: bytes) -> bytes:
        """Device -> broker: mount PUBLISH topics and (UN)SUBSCRIBE filters under the prefix."""
        return self._out.feed(data)

    def inbound(self, data: bytes) -> bytes:
        """Broker -> device: strip the prefix from PUBLISH topics under it."""
        return self._in.feed(data)

    def _rewrite_outbound(self, first: int, body: memoryview) -> list[_Chunk] | None:
        kind = first >> 4
        if kind == _PUBLISH:
            return self._publish_outbound(first, body)
        if kind == _CONNECT:
            raise MqttError("protocol_error", "second CONNECT [MQTT-3.1.0-2]")
        return self._filters_outbound(first, body)

    def _publish_outbound(self, first: int, body: memoryview) -> list[_Chunk] | None:
        qos = (first >> 1) & 3
        if qos == 3:
            raise MqttError("malformed", "PUBLISH with QoS 3")
        topic_end = _topic_end(body)
        after_id = topic_end + (2 if qos else 0)
        if after_id > len(body) or (qos and body[topic_end] == body[topic_end + 1] == 0):
            raise MqttError("malformed", "PUBLISH at QoS > 0 needs a non-zero packet id")
        if topic_end == 2 and self._v5:
            # An empty topic names an alias the broker already maps to a mounted topic.
            _, numbers = _Reader(body, after_id, len(body)).properties(_CLIENT_PUBLISH_PROPERTIES)
            if not numbers.get(_TOPIC_ALIAS):
                raise MqttError("invalid_topic", "empty topic without a Topic Alias")
            return None
        topic = body[2:topic_end]
        _check_device_topic(_decode_str(topic))
        topic_len = len(self._prefix_bytes) + topic_end - 2
        return _publish(first, topic_len, [self._prefix_bytes, topic], body[topic_end:])

    def _filters_outbound(self, first: int, body: memoryview) -> list[_Chunk]:
        if first & 0x0F != 0x02:
            raise MqttError("malformed", "(UN)SUBSCRIBE fixed header flags must be 0010")
        subscribe = first >> 4 == _SUBSCRIBE
        reader = _Reader(body, 0, len(body))
        if reader.u16() == 0:
            raise MqttError("malformed", "packet id 0")
        if self._v5:
            reader.properties(_SUBSCRIBE_PROPERTIES if subscribe else _UNSUBSCRIBE_PROPERTIES)
        parts: list[_Chunk] = [body[: reader.pos]]
        while reader.remaining:
            mounted = mount_filter(self.prefix, reader.string()).encode()
            if len(mounted) > _MAX_U16:
                raise MqttError("topic_too_long", f"mounted filter would be {len(mounted)} bytes")
            parts += [len(mounted).to_bytes(2), mounted]
            if subscribe:
                options = reader.u8()
                self._check_options(options)
                parts.append(bytes((options,)))
        if len(parts) == 1:
            raise MqttError("protocol_error", "(UN)SUBSCRIBE without topic filters")
        length = sum(len(part) for part in parts)
        if length > MAX_REMAINING_LENGTH:
            raise MqttError("packet_too_large", "mounted packet exceeds the MQTT maximum")
        return [bytes((first,)) + remaining_length(length), *parts]

    def _check_options(self, options: int) -> None:
        reserved = 0xC0 if self._v5 else 0xFC
        if options & reserved or options & 0x03 == 3 or (options >> 4) & 0x03 == 3:
            raise MqttError("malformed", "bad subscription options")

    def _rewrite_inbound(self, first: int, body: memoryview) -> list[_Chunk] | None:
        topic_end = _topic_end(body)
        cut = 2 + len(self._prefix_bytes)
        # A topic equal to the prefix would strip to "", which 5.0 reads as a Topic Alias use.
        if topic_end <= cut or body[2:cut] != self._prefix_bytes:
            return None
        return _publish(first, topic_end - cut, [body[cut:topic_end]], body[topic_end:])
