"""The source-address program picks, in the kernel, the socket ``source_slot`` says: real
SO_REUSEPORT groups on loopback, IPv4 and IPv6."""

from __future__ import annotations

import select
import socket

import pytest

from fleetgate.config.schema import NodeConfig
from fleetgate.dataplane.affinity import PortSharing, source_slot


def _group(family: socket.AddressFamily, host: str, size: int) -> list[socket.socket]:
    group: list[socket.socket] = []
    for _ in range(size):
        sock = socket.socket(family)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, group[0].getsockname()[1] if group else 0))
        sock.listen(64)
        group.append(sock)
    return group


def _taken_by(group: list[socket.socket], source: str) -> int:
    """Which socket of ``group`` accepts a connection from ``source``."""
    address = group[0].getsockname()[:2]
    with socket.socket(group[0].family) as client:
        client.bind((source, 0))
        client.connect(address)
        ready, _, _ = select.select(group, [], [], 5)
        assert ready, "no socket of the group accepted"
        accepted, _ = ready[0].accept()
        accepted.close()
        return group.index(ready[0])


@pytest.mark.parametrize("size", [2, 3])
def test_ipv4_sources_go_where_source_slot_says(size: int) -> None:
    group = _group(socket.AF_INET, "127.0.0.1", size)
    try:
        PortSharing(size, by_source=True).steer(group[0])
        sources = [f"127.0.0.{i}" for i in range(2, 26)]
        taken = {source: {_taken_by(group, source) for _ in range(2)} for source in sources}
    finally:
        for sock in group:
            sock.close()
    assert taken == {source: {source_slot(source, size)} for source in sources}
    assert {slot for slots in taken.values() for slot in slots} == set(range(size))  # spread


def test_ipv6_sources_go_where_source_slot_says() -> None:
    group = _group(socket.AF_INET6, "::1", 3)
    try:
        PortSharing(3, by_source=True).steer(group[0])
        taken = {_taken_by(group, "::1") for _ in range(4)}
    finally:
        for sock in group:
            sock.close()
    assert taken == {source_slot("::1", 3)}


def test_one_process_shares_nothing_and_connection_affinity_attaches_nothing() -> None:
    assert PortSharing.for_node(NodeConfig(workers=1)) is None
    assert PortSharing.for_node(NodeConfig(workers=4)) == PortSharing(4, by_source=True)
    spread = PortSharing.for_node(NodeConfig(workers=4, worker_affinity="connection"))
    assert spread == PortSharing(4, by_source=False)
    with socket.socket() as sock:
        spread.steer(sock)  # not even a reuseport socket: it must not try
