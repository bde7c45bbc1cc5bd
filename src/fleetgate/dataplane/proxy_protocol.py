"""The PROXY protocol version 2 header (HAProxy's specification): tells a TCP destination who
the device really is — its address and port, and its fleetgate device id in a TLV."""

from __future__ import annotations

import ipaddress
import struct

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_PROXY = 0x21
_TCP4 = 0x11
_TCP6 = 0x21
PP2_TYPE_UNIQUE_ID = 0x05  # the gateway's connection id
PP2_TYPE_FLEETGATE_DEVICE = 0xE0  # first of the custom range: the device id (UTF-8)
MAX_TLV_VALUE = 128  # PP2_TYPE_UNIQUE_ID is at most 128 bytes; device ids are shorter


def _tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


def header_v2(
    source: tuple[str, int],
    destination: tuple[str, int],
    *,
    device_id: str,
    connection_id: str,
) -> bytes:
    src = ipaddress.ip_address(source[0])
    dst = ipaddress.ip_address(destination[0])
    if src.version != dst.version:  # an IPv4 device through an IPv6 listener, say
        src = ipaddress.IPv6Address(f"::ffff:{src}") if src.version == 4 else src
        dst = ipaddress.IPv6Address(f"::ffff:{dst}") if dst.version == 4 else dst
    family = _TCP4 if src.version == 4 else _TCP6
    addresses = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1])
    tlvs = _tlv(PP2_TYPE_UNIQUE_ID, connection_id.encode()[:MAX_TLV_VALUE]) + _tlv(
        PP2_TYPE_FLEETGATE_DEVICE, device_id.encode()[:MAX_TLV_VALUE]
    )
    body = addresses + tlvs
    return SIGNATURE + struct.pack("!BBH", _V2_PROXY, family, len(body)) + body
