"""What a remote access session is, and what happens to it."""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fleetgate.errors import InvalidRequest


class EventKind(enum.StrEnum):
    CREATED = "CREATED"  # opened through the API
    ACCESS = "ACCESS"  # a connection arrived from an allowed source
    DENIED = "DENIED"  # a connection from outside the session's CIDRs
    CONNECTED = "CONNECTED"  # relayed to the device
    CLOSED = "CLOSED"  # a relayed connection ended (duration, bytes each way)
    REFUSED = "REFUSED"  # the connection was wrong for the session (with a diagnosis)
    EXPIRED = "EXPIRED"  # the session's time ran out
    DELETED = "DELETED"  # closed through the API
    ENDED = "ENDED"  # ended because its device changed (deleted, disabled, re-addressed, moved)


@dataclass(frozen=True)
class Session:
    id: str
    device_id: str
    group: str
    device_address: str
    device_port: int
    public_port: int
    cidrs: tuple[str, ...]
    tls: bool
    created_at: datetime
    expires_at: datetime
    ended_at: datetime | None
    end_reason: str | None
    created_by: str
    # mtls: the client certificate minted for this session alone (serial; PEM chain, leaf first)
    client_serial: str | None = None
    client_chain: str | None = None

    @property
    def open(self) -> bool:
        return self.ended_at is None

    def allows(self, source: str) -> bool:
        """Whether a connection from ``source`` may use the session."""
        try:
            address = ipaddress.ip_address(source)
        except ValueError:
            return False
        return any(address in ipaddress.ip_network(cidr) for cidr in self.cidrs)


@dataclass(frozen=True)
class SessionEvent:
    id: int
    session_id: str
    at: datetime
    kind: EventKind
    source: str | None
    destination: str | None
    detail: Mapping[str, Any]


def check_cidrs(cidrs: Sequence[str]) -> tuple[str, ...]:
    """Normalized networks (``203.0.113.7`` becomes ``203.0.113.7/32``); at most 32."""
    if not cidrs:
        raise InvalidRequest("at least one source CIDR", field="cidrs")
    if len(cidrs) > 32:
        raise InvalidRequest("at most 32 source CIDRs", field="cidrs")
    normalized = []
    for cidr in cidrs:
        try:
            normalized.append(str(ipaddress.ip_network(cidr, strict=False)))
        except ValueError:
            raise InvalidRequest(
                f"{cidr[:60]!r} is not an address or CIDR", field="cidrs"
            ) from None
    return tuple(dict.fromkeys(normalized))


MAX_SESSION_PORTS = 256  # entries in a group's settings.session_ports


def valid_session_ports(ports: object) -> bool:
    """A group's ``settings.session_ports``: the device ports sessions may reach in it."""
    return (
        isinstance(ports, list)
        and len(ports) <= MAX_SESSION_PORTS
        and all(type(p) is int and 1 <= p <= 65535 for p in ports)
    )


@dataclass(frozen=True)
class BindFailure:
    """Why a session is not served: ``bind_failed`` (its public port is held by another
    program: worth another port) or ``tls_failed`` (the sessions certificate would not load)."""

    reason: str
    why: str
