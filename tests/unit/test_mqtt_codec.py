"""The MQTT codec against byte vectors assembled by hand from the 3.1.1 and 5.0 specifications.

Vectors are written out in hex, field by field, from the packet layouts in MQTT 3.1.1 (OASIS
2014) and MQTT 5.0 (OASIS 2019), so the codec is checked against the specifications rather
than against itself. Property tests then fuzz every parser and check round trips and
"split the stream anywhere, get the same bytes".
"""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetgate.dataplane.mqtt_codec import (
    MQTT_5,
    MQTT_311,
    ConnackCode,
    Connect,
    MqttError,
    TopicMount,
    Will,
    encode_connack,
    encode_connect,
    frame,
    mount_filter,
    mount_topic,
    parse_connack,
    parse_connect,
    remaining_length,
)
from fleetgate.errors import FleetgateError

PREFIX = "devices/d1/"
MAX = 1 << 20
H = bytes.fromhex


def utf8(text: str) -> bytes:
    """A length-prefixed UTF-8 string (3.1.1 section 1.5.3)."""
    raw = text.encode()
    return len(raw).to_bytes(2) + raw


def packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + remaining_length(len(body)) + body


def reason(exc: pytest.ExceptionInfo[MqttError]) -> str:
    return exc.value.reason


# --- remaining length and framing ---------------------------------------------------------------

# 3.1.1 Table 2.4 / 5.0 section 1.5.5: the bounds of each encoded length.
VARINTS = [
    (0, "00"),
    (127, "7f"),
    (128, "8001"),
    (16_383, "ff7f"),
    (16_384, "808001"),
    (2_097_151, "ffff7f"),
    (2_097_152, "80808001"),
    (268_435_455, "ffffff7f"),
]


@pytest.mark.parametrize(("value", "encoded"), VARINTS)
def test_remaining_length_matches_the_spec_table(value: int, encoded: str) -> None:
    assert remaining_length(value) == H(encoded)


@pytest.mark.parametrize("value", [-1, 268_435_456])
def test_remaining_length_out_of_range_is_our_error(value: int) -> None:
    with pytest.raises(ValueError, match="variable byte integer"):
        remaining_length(value)


@pytest.mark.parametrize(("value", "encoded"), VARINTS)
def test_frame_reads_each_length_from_the_header_alone(value: int, encoded: str) -> None:
    header = b"\x30" + H(encoded)
    total = len(header) + value
    assert frame(header, total) == ((total, len(header)) if value == 0 else None)
    with pytest.raises(MqttError) as exc:
        frame(header, total - 1)
    assert reason(exc) == "packet_too_large"


def test_frame_at_every_split_point() -> None:
    body = utf8("a/b") + bytes(200)  # a two-byte remaining length: 205 = 0xCD 0x01
    whole = packet(0x30, body) + H("c000")
    assert whole[:3] == H("30cd01")
    for cut in range(len(whole) + 1):
        expected = (208, 3) if cut >= 208 else None
        assert frame(whole[:cut], MAX) == expected
        assert frame(bytearray(whole[:cut]), MAX) == expected
        assert frame(memoryview(whole)[:cut], MAX) == expected


def test_frame_refuses_a_large_packet_before_its_body_arrives() -> None:
    with pytest.raises(MqttError) as exc:
        frame(H("30ffff7f"), 1024)  # declares 2 MB, nothing of it has arrived
    assert reason(exc) == "packet_too_large"
    assert frame(H("3080"), 1024) is None  # the length itself is still incomplete
    assert frame(H("c000"), 2) == (2, 2)


@pytest.mark.parametrize(
    "header",
    [
        "30ffffffff",  # a fifth length byte
        "30ffffff80",  # fourth byte still says "more follows"
        "308000",  # 5.0 section 1.5.5: the shortest encoding is required
        "30ff8000",
    ],
)
def test_frame_refuses_a_malformed_length(header: str) -> None:
    with pytest.raises(MqttError) as exc:
        frame(H(header) + bytes(8), MAX)
    assert reason(exc) == "malformed"


# --- CONNECT --------------------------------------------------------------------------------------

# 3.1.1 section 3.1: flags 0xCE = user name, password, will QoS 1, will flag, clean session.
CONNECT_311 = H(
    "10 23"
    "0004 4d515454"  # protocol name "MQTT"
    "04"  # protocol level 4
    "ce"  # connect flags
    "000a"  # keep alive 10 s
    "0004 64657631"  # client id "dev1"
    "0003 612f62"  # will topic "a/b"
    "0002 6869"  # will message "hi"
    "0004 75736572"  # user name "user"
    "0002 7077"  # password "pw"
)
CONNECT_311_VALUE = Connect(
    level=4,
    protocol_name="MQTT",
    clean_start=True,
    keep_alive=10,
    client_id="dev1",
    username="user",
    password=b"pw",
    will=Will("a/b", b"hi", 1, False, b""),
    properties=b"",
)

# 5.0 section 3.1.2: flags 0xC2 = user name, password, clean start; Session Expiry Interval 10.
CONNECT_5 = H(
    "10 20"
    "0004 4d515454 05 c2 000a"
    "05 11 0000000a"  # properties: length 5, Session Expiry Interval (0x11) = 10
    "0004 64657631"  # client id "dev1"
    "0004 75736572"  # user name "user"
    "0002 7077"  # password "pw"
)
CONNECT_5_VALUE = Connect(5, "MQTT", True, 10, "dev1", "user", b"pw", None, H("110000000a"))

# 5.0 with a will: flags 0x2E = will retain, will QoS 1, will flag, clean start; no properties;
# will properties: Will Delay Interval (0x18) = 30, one User Property (0x26) "k" = "v".
CONNECT_5_WILL = H(
    "10 22"
    "0004 4d515454 05 2e 003c"
    "00"  # no CONNECT properties
    "0000"  # empty client id
    "0c 18 0000001e 26 0001 6b 0001 76"  # will properties
    "0001 74"  # will topic "t"
    "0003 000102"  # will payload
)
CONNECT_5_WILL_VALUE = Connect(
    5,
    "MQTT",
    True,
    60,
    "",
    None,
    None,
    Will("t", H("000102"), 1, True, H("180000001e2600016b000176")),
    b"",
)

# 3.1 ("MQIsdp", level 3), clean session, keep alive 60, client id "c1".
CONNECT_31 = H("10 10 0006 4d5149736470 03 02 003c 0002 6331")


@pytest.mark.parametrize(
    ("wire", "value"),
    [
        (CONNECT_311, CONNECT_311_VALUE),
        (CONNECT_5, CONNECT_5_VALUE),
        (CONNECT_5_WILL, CONNECT_5_WILL_VALUE),
        (CONNECT_31, Connect(3, "MQIsdp", True, 60, "c1", None, None, None, b"")),
    ],
    ids=["3.1.1", "5.0", "5.0-will", "3.1"],
)
def test_connect_spec_vectors_decode_and_encode(wire: bytes, value: Connect) -> None:
    assert parse_connect(wire) == value
    assert encode_connect(value) == wire


def test_rewritten_connect_round_trips() -> None:
    rewritten = dataclasses.replace(
        parse_connect(CONNECT_5_WILL),
        client_id="plc-1",
        username="gw",
        password=b"s3cret",
        will=Will(mount_topic(PREFIX, "t"), b"bye", 2, False, b""),
    )
    assert parse_connect(encode_connect(rewritten)) == rewritten


def test_password_stays_out_of_repr() -> None:
    assert "pw" not in repr(CONNECT_311_VALUE)


def test_password_without_user_name_only_in_5() -> None:
    v5 = H("10 12 0004 4d515454 05 42 0000 00 0000 0003 616263")
    assert parse_connect(v5).password == b"abc"
    assert parse_connect(v5).username is None
    v4 = H("10 11 0004 4d515454 04 42 0000 0000 0003 616263")
    with pytest.raises(MqttError) as exc:
        parse_connect(v4)
    assert reason(exc) == "malformed"
    with pytest.raises(ValueError, match="user name"):
        encode_connect(dataclasses.replace(CONNECT_311_VALUE, username=None))


def _connect_with(level: int, flags: int, tail: bytes = b"", name: str = "MQTT") -> bytes:
    props = b"\x00" if level == MQTT_5 else b""
    return packet(0x10, utf8(name) + bytes((level, flags)) + H("0000") + props + utf8("c") + tail)


@pytest.mark.parametrize(
    ("wire", "slug"),
    [
        (_connect_with(4, 0x02, name="MQTX"), "protocol_name"),
        (_connect_with(4, 0x02, name="MQIsdp"), "protocol_version"),
        (_connect_with(3, 0x02), "protocol_version"),
        (_connect_with(6, 0x02), "protocol_version"),
        (_connect_with(4, 0x03), "malformed"),  # reserved connect flag
        (_connect_with(5, 0x03), "malformed"),
        (_connect_with(4, 0x1C, utf8("t") + utf8("m")), "malformed"),  # will QoS 3
        (_connect_with(4, 0x08), "malformed"),  # will QoS without will flag
        (_connect_with(4, 0x20), "malformed"),  # will retain without will flag
        (_connect_with(4, 0x04, utf8("a/#") + utf8("m")), "invalid_topic"),
        (_connect_with(4, 0x04, utf8("") + utf8("m")), "invalid_topic"),
        (_connect_with(4, 0x02, b"\x00"), "malformed"),  # a byte after the payload
        (_connect_with(4, 0x80), "malformed"),  # user name flag, no user name
        (_connect_with(4, 0x02)[:-1], "malformed"),  # remaining length says one more
        (H("12 0c 0004 4d515454 04 02 0000 0000"), "malformed"),  # fixed header flags
        (H("20 02 0000"), "not_connect"),
        (b"", "malformed"),
        (H("10"), "malformed"),
        (packet(0x10, utf8("MQTT") + H("04 02 0000 0002 ff61")), "malformed"),  # not UTF-8
        (packet(0x10, utf8("MQTT") + H("04 02 0000 0002 6100")), "malformed"),  # U+0000
        (packet(0x10, utf8("MQTT") + H("04 02 0000 0003 eda080")), "malformed"),  # surrogate
        (packet(0x10, utf8("MQTT") + H("05 02 0000 03 230001 0000")), "malformed"),  # alias
        (packet(0x10, utf8("MQTT") + H("05 02 0000 02 0101 0000")), "malformed"),  # PUBLISH-only
        (packet(0x10, utf8("MQTT") + H("05 02 0000 06 2100012100 01 0000")), "protocol_error"),
        (packet(0x10, utf8("MQTT") + H("05 02 0000 09 0000")), "malformed"),  # length overrun
        (packet(0x10, utf8("MQTT") + H("05 02 0000 02 7f00 0000")), "malformed"),  # unknown id
    ],
)
def test_connect_refusals(wire: bytes, slug: str) -> None:
    with pytest.raises(MqttError) as exc:
        parse_connect(wire)
    assert reason(exc) == slug


@pytest.mark.parametrize(
    "change",
    [
        {"level": 6},
        {"protocol_name": "MQIsdp"},
        {"keep_alive": 65536},
        {"client_id": "a\x00b"},
        {"client_id": "\ud800"},
        {"client_id": "x" * 65536},
        {"properties": H("11")},
        {"properties": H("2300 01")},
        {"will": Will("a/+", b"", 0, False, b"")},
        {"will": Will("a", b"", 3, False, b"")},
    ],
)
def test_encode_connect_refuses_what_mqtt_cannot_say(change: dict[str, object]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
        encode_connect(dataclasses.replace(CONNECT_5_VALUE, **change))  # type: ignore[arg-type]


def test_encode_connect_refuses_properties_before_5() -> None:
    with pytest.raises(ValueError, match=r"only in MQTT 5\.0"):
        encode_connect(dataclasses.replace(CONNECT_311_VALUE, properties=H("110000000a")))


# --- CONNACK --------------------------------------------------------------------------------------

CONNACK_311_CODES = {
    ConnackCode.ACCEPTED: 0x00,
    ConnackCode.UNSUPPORTED_VERSION: 0x01,
    ConnackCode.IDENTIFIER_REJECTED: 0x02,
    ConnackCode.SERVER_UNAVAILABLE: 0x03,
    ConnackCode.BAD_CREDENTIALS: 0x04,
    ConnackCode.NOT_AUTHORIZED: 0x05,
    ConnackCode.PACKET_TOO_LARGE: 0x03,  # 3.1.1 has no such code: "server unavailable"
}
CONNACK_5_CODES = {
    ConnackCode.ACCEPTED: 0x00,
    ConnackCode.UNSUPPORTED_VERSION: 0x84,
    ConnackCode.IDENTIFIER_REJECTED: 0x85,
    ConnackCode.BAD_CREDENTIALS: 0x86,
    ConnackCode.NOT_AUTHORIZED: 0x87,
    ConnackCode.SERVER_UNAVAILABLE: 0x88,
    ConnackCode.PACKET_TOO_LARGE: 0x95,
}


@pytest.mark.parametrize("code", list(ConnackCode))
def test_connack_vectors(code: ConnackCode) -> None:
    v4 = bytes((0x20, 0x02, 0x00, CONNACK_311_CODES[code]))
    v5 = bytes((0x20, 0x03, 0x00, CONNACK_5_CODES[code], 0x00))  # empty property list
    assert encode_connack(MQTT_311, code) == v4
    assert encode_connack(3, code) == v4
    assert encode_connack(MQTT_5, code) == v5
    assert parse_connack(v4, MQTT_311) == (False, CONNACK_311_CODES[code])
    assert parse_connack(v5, MQTT_5) == (False, CONNACK_5_CODES[code])


def test_connack_session_present() -> None:
    assert encode_connack(4, ConnackCode.ACCEPTED, session_present=True) == H("20020100")
    assert parse_connack(H("20020100"), 4) == (True, 0)
    # A broker's 5.0 CONNACK with Maximum QoS 1 and an Assigned Client Identifier "x".
    assert parse_connack(H("2009 01 00 06 2401 120001 78"), 5) == (True, 0)
    with pytest.raises(ValueError, match="session"):
        encode_connack(4, ConnackCode.NOT_AUTHORIZED, session_present=True)


@pytest.mark.parametrize(
    ("wire", "level", "slug"),
    [
        ("20020105", 4, "malformed"),  # session present on a refusal
        ("20020200", 4, "malformed"),  # reserved acknowledge flag
        ("20020006", 4, "malformed"),  # reserved return code
        ("2003000000", 4, "malformed"),  # a properties byte at 3.1.1
        ("20020000", 5, "malformed"),  # 5.0 needs the property length
        ("2003008b00", 5, "malformed"),  # 0x8B is a DISCONNECT reason, not CONNACK
        ("2005000002 1700", 5, "malformed"),  # Request Problem Information is CONNECT-only
        ("22020000", 4, "malformed"),
        ("30020000", 4, "not_connack"),
        ("2002", 4, "malformed"),
    ],
)
def test_connack_refusals(wire: str, level: int, slug: str) -> None:
    with pytest.raises(MqttError) as exc:
        parse_connack(H(wire), level)
    assert reason(exc) == slug


# --- topic mounts: outbound -----------------------------------------------------------------------

MOUNTED_AB = utf8(PREFIX + "a/b")  # 00 0e "devices/d1/a/b"


def mount(level: int = MQTT_311) -> TopicMount:
    return TopicMount(level, PREFIX, MAX)


@pytest.mark.parametrize("level", [3, 4, 5])
@pytest.mark.parametrize(
    ("first", "packet_id"),
    [(0x30, ""), (0x31, ""), (0x32, "000a"), (0x3B, "000a"), (0x34, "000a")],
    ids=["qos0", "qos0-retain", "qos1", "qos1-dup-retain", "qos2"],
)
def test_publish_topic_is_mounted(level: int, first: int, packet_id: str) -> None:
    props = "00" if level == MQTT_5 else ""
    # 3.1.1 section 3.3 / 5.0 section 3.3: topic "a/b", packet id 10 when QoS > 0, payload.
    wire = packet(first, H("0003 612f62" + packet_id + props) + b"hello")
    expected = packet(first, MOUNTED_AB + H(packet_id + props) + b"hello")
    assert mount(level).outbound(wire) == expected


def test_publish_5_properties_pass_intact() -> None:
    # QoS 1, packet id 10; properties: Payload Format Indicator 1, User Property "k" = "v".
    props = H("09 0101 26 0001 6b 0001 76")
    wire = H("32 13 0003 612f62 000a") + props + b"hi"
    assert wire[1] == len(wire) - 2
    out = mount(MQTT_5).outbound(wire)
    assert out == packet(0x32, MOUNTED_AB + H("000a") + props + b"hi")


def test_publish_length_reencoded_across_a_varint_boundary() -> None:
    wire = packet(0x30, utf8("a/b") + bytes(120))  # remaining length 125: one byte
    out = mount().outbound(wire)
    assert out[:3] == H("308801")  # 136 needs two
    assert out[3:] == MOUNTED_AB + bytes(120)


def test_publish_empty_topic_with_alias_passes_unchanged_in_5() -> None:
    wire = H("30 08 0000 03 230001 6869")  # topic "", Topic Alias 1, payload "hi"
    assert mount(MQTT_5).outbound(wire) == wire


@pytest.mark.parametrize(
    ("level", "wire", "slug"),
    [
        (5, H("30 04 0000 00 68"), "invalid_topic"),  # empty topic, no alias
        (5, H("30 06 0000 03 230000"), "invalid_topic"),  # alias 0 is not an alias
        (5, H("30 08 0000 05 230001 0b01"), "malformed"),  # Subscription Id from a client
        (4, H("30 03 0000 68"), "invalid_topic"),
        (4, packet(0x30, utf8("$SYS/broker/load") + b"x"), "forbidden_topic"),
        (4, packet(0x30, utf8("$share/g/a") + b"x"), "forbidden_topic"),
        (4, packet(0x30, utf8("a/+") + b"x"), "invalid_topic"),
        (4, packet(0x30, utf8("a/#")), "invalid_topic"),
        (4, packet(0x36, utf8("a/b") + H("000a")), "malformed"),  # QoS 3
        (4, packet(0x32, utf8("a/b") + H("0000")), "malformed"),  # packet id 0
        (4, packet(0x32, utf8("a/b") + H("00")), "malformed"),  # packet id cut short
        (4, H("30 01 00"), "malformed"),
        (4, H("30 03 0005 61"), "malformed"),  # topic longer than the packet
        (4, packet(0x30, H("0002 ff61")), "malformed"),  # not UTF-8
        (4, CONNECT_311, "protocol_error"),  # a second CONNECT
    ],
)
def test_publish_refusals(level: int, wire: bytes, slug: str) -> None:
    with pytest.raises(MqttError) as exc:
        mount(level).outbound(wire)
    assert reason(exc) == slug


def test_subscribe_311_vector() -> None:
    # 3.1.1 section 3.8: packet id 10; "a/b" QoS 1, "c/d" QoS 2.
    wire = H("82 0e 000a 0003 612f62 01 0003 632f64 02")
    expected = H("82 24 000a") + MOUNTED_AB + H("01") + utf8(PREFIX + "c/d") + H("02")
    assert mount().outbound(wire) == expected


def test_subscribe_5_vector() -> None:
    # 5.0 section 3.8: packet id 10, Subscription Identifier 5; "a/b" with options
    # QoS 1 | No Local | Retain Handling 1 = 0x15.
    wire = H("82 0b 000a 02 0b05 0003 612f62 15")
    assert mount(MQTT_5).outbound(wire) == H("82 16 000a 02 0b05") + MOUNTED_AB + H("15")


def test_unsubscribe_vectors() -> None:
    assert mount().outbound(H("a2 07 000b 0003 612f62")) == H("a2 12 000b") + MOUNTED_AB
    wire_5 = H("a2 08 000b 00 0003 612f62")
    assert mount(MQTT_5).outbound(wire_5) == H("a2 13 000b 00") + MOUNTED_AB


def test_shared_subscription_keeps_its_share() -> None:
    wire = packet(0x82, H("000a") + utf8("$share/grp/a/+") + H("01"))
    expected = packet(0x82, H("000a") + utf8("$share/grp/devices/d1/a/+") + H("01"))
    assert mount().outbound(wire) == expected
    assert mount_filter(PREFIX, "#") == "devices/d1/#"


@pytest.mark.parametrize(
    ("topic_filter", "slug"),
    [
        ("$SYS/#", "forbidden_topic"),
        ("$share/g/$SYS/#", "forbidden_topic"),
        ("$queue/a", "forbidden_topic"),
        ("$share/g", "invalid_topic"),
        ("$share//a", "invalid_topic"),
        ("$share/g/", "invalid_topic"),
        ("$share/g+/a", "invalid_topic"),
        ("", "invalid_topic"),
    ],
)
def test_filter_refusals(topic_filter: str, slug: str) -> None:
    for kind, tail in ((0x82, H("00")), (0xA2, b"")):
        with pytest.raises(MqttError) as exc:
            mount().outbound(packet(kind, H("000a") + utf8(topic_filter) + tail))
        assert reason(exc) == slug


@pytest.mark.parametrize(
    ("level", "wire", "slug"),
    [
        (4, H("80 06 000a 0001 61 00"), "malformed"),  # flags must be 0010
        (4, H("82 02 000a"), "protocol_error"),  # no filters
        (4, H("a2 02 000a"), "protocol_error"),
        (4, H("82 06 0000 0001 61 00"), "malformed"),  # packet id 0
        (4, H("82 06 000a 0001 61 03"), "malformed"),  # QoS 3
        (4, H("82 06 000a 0001 61 04"), "malformed"),  # reserved at 3.1.1
        (5, H("82 07 000a 00 0001 61 40"), "malformed"),  # reserved at 5.0
        (5, H("82 07 000a 00 0001 61 30"), "malformed"),  # Retain Handling 3
        (4, H("82 05 000a 0001 61"), "malformed"),  # options byte missing
        (5, H("82 09 000a 02 2301 0001 61 00"), "malformed"),  # Topic Alias in SUBSCRIBE
        (5, H("a2 08 000a 02 0b01 0001 61"), "malformed"),  # Subscription Id in UNSUBSCRIBE
        (5, H("82 0b 000a 04 0b01 0b02 0001 61 00"), "protocol_error"),  # two Subscription Ids
    ],
)
def test_subscribe_refusals(level: int, wire: bytes, slug: str) -> None:
    with pytest.raises(MqttError) as exc:
        mount(level).outbound(wire)
    assert reason(exc) == slug


def test_mounted_topic_too_long() -> None:
    long_topic = "a" * (65535 - len(PREFIX) + 1)
    with pytest.raises(MqttError) as exc:
        mount().outbound(packet(0x30, utf8(long_topic)))
    assert reason(exc) == "topic_too_long"
    with pytest.raises(MqttError) as exc:
        mount().outbound(packet(0x82, H("000a") + utf8(long_topic) + H("00")))
    assert reason(exc) == "topic_too_long"


# --- topic mounts: inbound, pass-through, streaming -----------------------------------------------


@pytest.mark.parametrize("level", [4, 5])
def test_inbound_publish_is_unmounted(level: int) -> None:
    props = H("00") if level == MQTT_5 else b""
    wire = packet(0x32, MOUNTED_AB + H("000a") + props + b"hello")
    expected = packet(0x32, utf8("a/b") + H("000a") + props + b"hello")
    assert mount(level).inbound(wire) == expected


@pytest.mark.parametrize(
    "topic", ["other/x", "devices/d10/x", "devices/d1", PREFIX, "$SYS/uptime", ""]
)
def test_inbound_publish_outside_the_prefix_passes_unchanged(topic: str) -> None:
    wire = packet(0x30, utf8(topic) + b"x")
    assert mount(MQTT_5).inbound(wire) == wire


NON_TOPIC_PACKETS = [
    H("c000"),  # PINGREQ
    H("d000"),  # PINGRESP
    H("e000"),  # DISCONNECT
    H("4002000a"),  # PUBACK
    H("5002000a"),  # PUBREC
    H("6202000a"),  # PUBREL
    H("7002000a"),  # PUBCOMP
    H("9003000a01"),  # SUBACK granting QoS 1
    H("b002000b"),  # UNSUBACK
    H("4004000a1000"),  # 5.0 PUBACK "no matching subscribers", empty properties
    H("e00204 00"),  # 5.0 DISCONNECT with will message
    H("f0021800"),  # 5.0 AUTH "continue authentication"
    H("20020000"),  # CONNACK
]


@pytest.mark.parametrize("wire", NON_TOPIC_PACKETS, ids=lambda b: b.hex())
def test_other_packets_pass_byte_identical(wire: bytes) -> None:
    for level in (3, 4, 5):
        assert mount(level).outbound(wire) == wire
        assert mount(level).inbound(wire) == wire


def _stream() -> tuple[bytes, bytes]:
    """A device stream and its expected mounted form."""
    subscribe = H("82 0e 000a 0003 612f62 01 0003 632f64 02")
    parts = [
        (packet(0x30, utf8("a/b") + b"x" * 130), packet(0x30, MOUNTED_AB + b"x" * 130)),
        (H("c000"), H("c000")),
        (subscribe, H("82 24 000a") + MOUNTED_AB + H("01") + utf8(PREFIX + "c/d") + H("02")),
        (H("4002000a"), H("4002000a")),
        (
            packet(0x34, utf8("a/b") + H("0001") + b"yz"),
            packet(0x34, MOUNTED_AB + H("0001") + b"yz"),
        ),
    ]
    return b"".join(p[0] for p in parts), b"".join(p[1] for p in parts)


def test_stream_split_at_every_byte_gives_the_same_bytes() -> None:
    wire, expected = _stream()
    assert mount().outbound(wire) == expected
    for cut in range(len(wire) + 1):
        m = mount()
        assert m.outbound(wire[:cut]) + m.outbound(wire[cut:]) == expected
    m = mount()
    assert b"".join(m.outbound(wire[i : i + 1]) for i in range(len(wire))) == expected


def test_incomplete_tail_is_held_back() -> None:
    m = mount()
    wire = packet(0x30, utf8("a/b") + b"x")
    assert m.outbound(wire + wire[:4]) == packet(0x30, MOUNTED_AB + b"x")
    assert m.outbound(wire[4:]) == packet(0x30, MOUNTED_AB + b"x")
    assert m.outbound(b"") == b""


def test_buffer_is_capped_at_max_packet() -> None:
    m = TopicMount(MQTT_311, PREFIX, 64)
    assert m.outbound(H("300a 0003 612f62")) == b""  # 12 bytes declared: waits for the rest
    m = TopicMount(MQTT_311, PREFIX, 64)
    with pytest.raises(MqttError) as exc:
        m.inbound(H("3041"))  # 67 bytes declared, refused before any body is buffered
    assert reason(exc) == "packet_too_large"


def test_mqtt_error_is_a_fleetgate_error() -> None:
    error = MqttError("malformed", "detail")
    assert isinstance(error, FleetgateError)
    assert (error.reason, str(error)) == ("malformed", "malformed: detail")


def test_a_failed_stream_stays_failed() -> None:
    m = mount()
    with pytest.raises(MqttError):
        m.outbound(packet(0x30, utf8("$SYS/x")))
    with pytest.raises(MqttError) as exc:
        m.outbound(H("c000"))
    assert reason(exc) == "forbidden_topic"
    assert m.inbound(H("d000")) == H("d000")  # the other direction is independent


@pytest.mark.parametrize("prefix", ["devices/d1", "$SYS/", "a/+/", "#/", "", "a\x00/"])
def test_prefix_must_be_a_safe_namespace(prefix: str) -> None:
    with pytest.raises(ValueError, match="prefix"):
        TopicMount(MQTT_311, prefix, MAX)


def test_mount_topic_for_a_will() -> None:
    assert mount_topic(PREFIX, "status") == "devices/d1/status"
    with pytest.raises(MqttError) as exc:
        mount_topic(PREFIX, "$SYS/x")
    assert reason(exc) == "forbidden_topic"


# --- property tests -------------------------------------------------------------------------------

texts = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)
topics = st.text(st.sampled_from("ab/$é 0"), min_size=1, max_size=10)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)


def _prop(ident: int, value: bytes) -> bytes:
    return bytes((ident,)) + value


@st.composite
def properties(draw: st.DrawFn, will: bool) -> bytes:
    """A valid CONNECT or will property list, assembled field by field (5.0 section 2.2.2)."""
    byte, pair = st.integers(0, 1).map(lambda n: bytes((n,))), st.tuples(texts, texts)
    if will:
        single = {
            0x18: u32.map(lambda n: n.to_bytes(4)),
            0x01: byte,
            0x02: u32.map(lambda n: n.to_bytes(4)),
            0x03: texts.map(utf8),
            0x08: topics.map(utf8),
            0x09: st.binary(max_size=8).map(lambda b: len(b).to_bytes(2) + b),
        }
    else:
        single = {
            0x11: u32.map(lambda n: n.to_bytes(4)),
            0x21: st.integers(1, 0xFFFF).map(lambda n: n.to_bytes(2)),
            0x27: st.integers(1, 0xFFFF_FFFF).map(lambda n: n.to_bytes(4)),
            0x22: u16.map(lambda n: n.to_bytes(2)),
            0x19: byte,
            0x17: byte,
            0x15: texts.map(utf8),
        }
    chosen = draw(st.lists(st.sampled_from(sorted(single)), unique=True))
    out = [_prop(ident, draw(single[ident])) for ident in chosen]
    out += [_prop(0x26, utf8(k) + utf8(v)) for k, v in draw(st.lists(pair, max_size=3))]
    return b"".join(draw(st.permutations(out)))


@st.composite
def connects(draw: st.DrawFn) -> Connect:
    level = draw(st.sampled_from([3, 4, 5]))
    v5 = level == MQTT_5
    will = None
    if draw(st.booleans()):
        will_props = draw(properties(will=True)) if v5 else b""
        will = Will(
            draw(topics),
            draw(st.binary(max_size=20)),
            draw(st.integers(0, 2)),
            draw(st.booleans()),
            will_props,
        )
    username = draw(st.none() | texts)
    password = draw(st.none() | st.binary(max_size=20))
    if password is not None and username is None and not v5:
        username = ""
    return Connect(
        level=level,
        protocol_name="MQIsdp" if level == 3 else "MQTT",
        clean_start=draw(st.booleans()),
        keep_alive=draw(u16),
        client_id=draw(texts),
        username=username,
        password=password,
        will=will,
        properties=draw(properties(will=False)) if v5 else b"",
    )


@given(connects())
def test_connect_round_trips(c: Connect) -> None:
    wire = encode_connect(c)
    header_len = next(i for i in range(1, 5) if wire[i] < 0x80) + 1
    assert frame(wire, len(wire)) == (len(wire), header_len)
    assert parse_connect(wire) == c


@given(st.binary(max_size=64))
def test_parse_connect_raises_only_mqtt_errors(data: bytes) -> None:
    for wire in (data, b"\x10" + data, packet(0x10, data[:127])):
        with contextlib.suppress(MqttError):
            parse_connect(wire)


@given(connects(), st.data())
def test_mutated_connects_raise_only_mqtt_errors(c: Connect, data: st.DataObject) -> None:
    wire = bytearray(encode_connect(c))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(wire) - 1))
        wire[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(wire)))
    for candidate in (bytes(wire), bytes(wire[:cut])):
        with contextlib.suppress(MqttError):
            parse_connect(candidate)


@given(st.binary(max_size=16), st.integers(0, 1 << 30))
def test_frame_raises_only_mqtt_errors(data: bytes, max_packet: int) -> None:
    try:
        result = frame(data, max_packet)
    except MqttError:
        return
    if result is not None:
        total, header_len = result
        assert 2 <= header_len <= 5
        assert header_len <= total <= min(len(data), max_packet)


@given(st.binary(max_size=8), st.sampled_from([4, 5]))
def test_parse_connack_raises_only_mqtt_errors(data: bytes, level: int) -> None:
    with contextlib.suppress(MqttError):
        parse_connack(b"\x20" + remaining_length(len(data)) + data, level)


@st.composite
def plausible_packets(draw: st.DrawFn) -> bytes:
    """A well-framed packet of any type with an arbitrary body: reaches past framing."""
    first = draw(st.sampled_from([0x30, 0x32, 0x34, 0x36, 0x3B, 0x82, 0xA2, 0x80, 0xC0, 0x10]))
    body = draw(
        st.binary(max_size=24) | st.builds(lambda t, b: utf8(t) + b, topics, st.binary(max_size=8))
    )
    return packet(first, body)


@given(
    st.lists(plausible_packets() | st.binary(max_size=8), max_size=5), st.sampled_from([3, 4, 5])
)
def test_topic_mount_raises_only_mqtt_errors(chunks: list[bytes], level: int) -> None:
    m = TopicMount(level, PREFIX, 128)
    for direction in (m.outbound, m.inbound):
        try:
            for chunk in chunks:
                direction(chunk)
        except MqttError:
            pass


@st.composite
def valid_packets(draw: st.DrawFn, level: int) -> list[bytes]:
    props = b"\x00" if level == MQTT_5 else b""
    out = []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["publish", "subscribe", "unsubscribe", "other"]))
        topic = draw(st.text(st.sampled_from("ab/é"), min_size=1, max_size=8))
        if kind == "publish":
            qos = draw(st.integers(0, 2))
            packet_id = H("0007") if qos else b""
            payload = draw(st.binary(max_size=140))
            out.append(packet(0x30 | qos << 1, utf8(topic) + packet_id + props + payload))
        elif kind == "subscribe":
            out.append(packet(0x82, H("0007") + props + utf8(topic) + H("01")))
        elif kind == "unsubscribe":
            out.append(packet(0xA2, H("0007") + props + utf8(topic)))
        else:
            out.append(draw(st.sampled_from(NON_TOPIC_PACKETS)))
    return out


@settings(max_examples=60)
@given(
    st.sampled_from([4, 5]).flatmap(lambda lv: st.tuples(st.just(lv), valid_packets(lv))),
    st.data(),
)
def test_split_anywhere_gives_the_same_bytes(
    case: tuple[int, list[bytes]], data: st.DataObject
) -> None:
    level, packets = case
    wire = b"".join(packets)
    mounted = b"".join(TopicMount(level, PREFIX, MAX).outbound(p) for p in packets)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=6)))
    pieces = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True)]
    split = TopicMount(level, PREFIX, MAX)
    assert b"".join(split.outbound(piece) for piece in pieces) == mounted
    assert TopicMount(level, PREFIX, MAX).outbound(wire) == mounted
    # Unmounting restores every PUBLISH; (UN)SUBSCRIBE are never rewritten inbound.
    expected_back = b"".join(
        p if p[0] >> 4 == 3 else TopicMount(level, PREFIX, MAX).outbound(p) for p in packets
    )
    unmount = TopicMount(level, PREFIX, MAX)
    assert b"".join(unmount.inbound(piece) for piece in (mounted[:7], mounted[7:])) == expected_back
