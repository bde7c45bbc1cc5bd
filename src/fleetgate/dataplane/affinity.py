"""Which of a node's processes takes a device's connection.

With ``node.workers = N`` every process binds each listener with ``SO_REUSEPORT``, and the
kernel picks one of the N sockets for each new connection (TCP) or datagram (UDP). Left alone it
hashes the whole address 4-tuple, so a device's next connection lands on any process, most
likely one that has never seen it: the device's registry entry, its parsed certificate and its
TLS session to the destination are cached in another. With ``node.worker_affinity =
"source_address"`` (the default) a small classic BPF program attached to the socket group
(``SO_ATTACH_REUSEPORT_CBPF``) picks the socket from a hash of the source address alone, IPv4 or
IPv6, so a device keeps coming back to the process that knows it. The choice moves when the
group changes (a restarted worker's socket joins at another place), and while a process is
missing the kernel's own hash takes the connections the program would send to it.

Devices behind one NAT address all land on one process: ``"connection"`` restores the
kernel's spreading for fleets that connect that way.
"""

from __future__ import annotations

import ctypes
import socket
import struct
from dataclasses import dataclass

from fleetgate.config.schema import NodeConfig

SO_ATTACH_REUSEPORT_CBPF = 51  # asm-generic/socket.h
_SKF_NET_OFF = -0x100000  # linux/filter.h: offsets from the network header

# Classic BPF opcodes (linux/bpf_common.h, linux/filter.h).
_LD_W_ABS, _LD_B_ABS = 0x20, 0x30
_RSH_K, _XOR_X, _MUL_K, _MOD_K = 0x74, 0xAC, 0x24, 0x94
_JEQ_K, _JA = 0x15, 0x05
_TAX, _RET_A = 0x07, 0x16


def _net(offset: int) -> int:
    return (_SKF_NET_OFF + offset) & 0xFFFF_FFFF


def _program(processes: int) -> list[tuple[int, int, int, int]]:
    """(code, jt, jf, k) instructions: A = hash(source address) % processes."""
    return [
        (_LD_B_ABS, 0, 0, _net(0)),  # 0: the version nibble
        (_RSH_K, 0, 0, 4),  # 1
        (_JEQ_K, 2, 0, 6),  # 2: IPv6 → 5, else 3
        (_LD_W_ABS, 0, 0, _net(12)),  # 3: IPv4 source
        (_JA, 0, 0, 3),  # 4: → 8
        (_LD_W_ABS, 0, 0, _net(16)),  # 5: IPv6 source, last 8 bytes folded
        (_TAX, 0, 0, 0),  # 6
        (_LD_W_ABS, 0, 0, _net(20)),  # 7 (then A ^= X at 8 folds them; for IPv4 X is 0)
        (_XOR_X, 0, 0, 0),  # 8
        (_TAX, 0, 0, 0),  # 9: mix, so addresses that differ in any bit spread evenly
        (_RSH_K, 0, 0, 16),  # 10
        (_XOR_X, 0, 0, 0),  # 11
        (_MUL_K, 0, 0, 0x045D_9F3B),  # 12
        (_TAX, 0, 0, 0),  # 13
        (_RSH_K, 0, 0, 16),  # 14
        (_XOR_X, 0, 0, 0),  # 15
        (_MOD_K, 0, 0, processes),  # 16
        (_RET_A, 0, 0, 0),  # 17
    ]


def source_slot(address: str, processes: int) -> int:
    """What the program computes for ``address``: the place in the socket group it picks.
    (Tests and operators use it to know where a device goes.)"""
    packed = socket.inet_pton(socket.AF_INET6 if ":" in address else socket.AF_INET, address)
    if len(packed) == 4:
        value = int.from_bytes(packed)
    else:
        value = int.from_bytes(packed[8:12]) ^ int.from_bytes(packed[12:16])
    value ^= value >> 16
    value = (value * 0x045D_9F3B) & 0xFFFF_FFFF
    value ^= value >> 16
    return value % processes


@dataclass(frozen=True)
class PortSharing:
    """How a process shares its listeners' ports with the node's other processes."""

    processes: int
    by_source: bool

    @classmethod
    def for_node(cls, node: NodeConfig) -> PortSharing | None:
        """None when one process serves everything (no port sharing at all)."""
        if node.workers < 2:
            return None
        return cls(node.workers, node.worker_affinity == "source_address")

    def steer(self, sock: socket.socket) -> None:
        """Attach the source-address program to ``sock``'s group (it applies to the group)."""
        if not self.by_source or self.processes < 2:
            return
        code = b"".join(struct.pack("HBBI", *op) for op in _program(self.processes))
        buffer = ctypes.create_string_buffer(code, len(code))
        fprog = struct.pack("HL", len(code) // 8, ctypes.addressof(buffer))
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)
