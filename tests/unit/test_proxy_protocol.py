"""The PROXY protocol v2 header against vectors assembled by hand from HAProxy's specification
(doc/proxy-protocol.txt, section 2.2): 12-byte signature, version/command byte, family/transport
byte, big-endian length of what follows, the addresses and ports, then type-length-value
entries."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetgate.dataplane.proxy_protocol import header_v2

SIGNATURE = bytes.fromhex("0d0a0d0a000d0a515549540a")  # "\r\n\r\n\0\r\nQUIT\n"


def test_ipv4_header_matches_the_hand_assembled_vector() -> None:
    header = header_v2(
        ("192.0.2.10", 51234),
        ("198.51.100.7", 1883),
        device_id="plc-7",
        connection_id="tcp-42",
    )
    expected = bytes.fromhex(
        "0d0a0d0a000d0a515549540a"  # signature
        "21"  # version 2, command PROXY
        "11"  # AF_INET, STREAM
        "001d"  # 29 bytes follow: 12 of addresses and ports, 9 + 8 of TLVs
        "c000020a"  # 192.0.2.10
        "c6336407"  # 198.51.100.7
        "c822"  # 51234
        "075b"  # 1883
        "050006" + b"tcp-42".hex()  # PP2_TYPE_UNIQUE_ID
        + "e00005" + b"plc-7".hex()  # first custom type: the device id
    )  # fmt: skip
    assert header == expected


def test_ipv6_header_matches_the_hand_assembled_vector() -> None:
    header = header_v2(
        ("2001:db8::1", 40000),
        ("2001:db8:0:1::443", 443),
        device_id="d",
        connection_id="c",
    )
    expected = bytes.fromhex(
        "0d0a0d0a000d0a515549540a"
        "21"
        "21"  # AF_INET6, STREAM
        "002c"  # 44 = 36 of addresses and ports + 4 + 4 of TLVs
        "20010db8000000000000000000000001"
        "20010db8000000010000000000000443"
        "9c40"  # 40000
        "01bb"  # 443
        "05000163"  # UNIQUE_ID "c"
        "e0000164"  # device "d"
    )
    assert header == expected


@pytest.mark.parametrize(
    ("source", "destination", "mapped_source", "mapped_destination"),
    [
        # an IPv4 device on a dual-stack listener bound to ::
        (("203.0.113.5", 1000), ("::", 2000), "00000000000000000000ffffcb007105", "0" * 32),
        (("2001:db8::5", 1000), ("10.0.0.1", 2000), "20010db8000000000000000000000005",
         "00000000000000000000ffff0a000001"),
    ],
)  # fmt: skip
def test_mixed_families_are_sent_as_ipv6_with_mapped_addresses(
    source: tuple[str, int],
    destination: tuple[str, int],
    mapped_source: str,
    mapped_destination: str,
) -> None:
    header = header_v2(source, destination, device_id="d", connection_id="c")
    assert header[12:14] == b"\x21\x21"
    (length,) = struct.unpack("!H", header[14:16])
    assert length == len(header) - 16 == 36 + 8
    assert header[16:48] == bytes.fromhex(mapped_source + mapped_destination)
    assert header[48:52] == struct.pack("!HH", source[1], destination[1])


def test_tlv_values_are_capped_at_the_unique_id_limit() -> None:
    header = header_v2(
        ("10.0.0.1", 1), ("10.0.0.2", 2), device_id="d" * 300, connection_id="c" * 300
    )
    tlvs = header[16 + 12 :]
    assert tlvs[:3] == b"\x05\x00\x80"  # 128 bytes, the spec's maximum for UNIQUE_ID
    assert tlvs[3 : 3 + 128] == b"c" * 128
    assert tlvs[131:134] == b"\xe0\x00\x80"
    assert len(tlvs) == 2 * (3 + 128)


@given(
    source=st.ip_addresses(v=4),
    destination=st.ip_addresses(v=4),
    ports=st.tuples(st.integers(0, 65535), st.integers(0, 65535)),
    device_id=st.text(st.characters(codec="ascii", categories=["L", "N"]), max_size=64),
    connection_id=st.text(st.characters(codec="ascii", categories=["L", "N"]), max_size=64),
)
def test_length_field_counts_every_byte_after_the_fixed_part(
    source: IPv4Address,
    destination: IPv4Address,
    ports: tuple[int, int],
    device_id: str,
    connection_id: str,
) -> None:
    header = header_v2(
        (str(source), ports[0]),
        (str(destination), ports[1]),
        device_id=device_id,
        connection_id=connection_id,
    )
    assert header.startswith(SIGNATURE + b"\x21\x11")
    (length,) = struct.unpack("!H", header[14:16])
    assert len(header) == 16 + length == 16 + 12 + 3 + len(connection_id) + 3 + len(device_id)
