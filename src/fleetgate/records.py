"""The values the registry keeps. Immutable; the store builds them and services pass them on."""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from fleetgate.errors import InvalidRequest

DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
GROUP_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
ATTRIBUTE_KEY_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
MAX_ATTRIBUTE_VALUE_CHARS = 256
MAX_ATTRIBUTES = 64
MAX_ADDRESSES = 16
MAX_NAME_CHARS = 200
# Route keys name listeners and values name destinations, spelled as in the configuration.
ROUTE_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
MAX_ROUTES = 32

# An attribute with one of these keys names one physical thing (a SIM, a modem, a unit), so two
# devices may not share a value. The store enforces it with a partial unique index.
UNIQUE_ATTRIBUTE_KEYS = ("imsi", "imei", "iccid", "serial")
DEFAULT_GROUP = "default"


class DeviceStatus(enum.StrEnum):
    ENABLED = "enabled"
    DISABLED = "disabled"


class Role(enum.StrEnum):
    ADMIN = "admin"
    OPERATOR = "operator"
    VIEWER = "viewer"


@dataclass(frozen=True)
class Device:
    id: str
    name: str
    group: str
    status: DeviceStatus
    attributes: Mapping[str, str]
    addresses: tuple[str, ...]
    created_at: datetime
    updated_at: datetime
    revision: int
    # Listener name -> destination name; overrides the group's settings.routes and the
    # listener's own destination. Last, with a default, so positional constructions still work.
    routes: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Group:
    name: str
    description: str
    settings: Mapping[str, Any]
    created_at: datetime
    updated_at: datetime
    revision: int


@dataclass(frozen=True)
class ApiToken:
    id: str
    name: str
    role: Role
    groups: tuple[str, ...]  # empty: every group
    created_at: datetime
    expires_at: datetime | None
    created_by: str


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: datetime
    actor: str
    action: str
    target_type: str
    target_id: str
    group: str | None
    request_id: str | None
    source: str | None
    before: Mapping[str, Any] | None
    after: Mapping[str, Any] | None


@dataclass(frozen=True)
class NewAuditEntry:
    actor: str
    action: str
    target_type: str
    target_id: str
    group: str | None = None
    request_id: str | None = None
    source: str | None = None
    before: Mapping[str, Any] | None = None
    after: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Page[T]:
    items: list[T]
    next_cursor: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


def check_device_id(value: str) -> str:
    if not DEVICE_ID_RE.fullmatch(value):
        raise InvalidRequest(
            f"device id {value[:140]!r} must be 1-128 characters of letters, digits, '.', '_', "
            "':' or '-', starting with a letter or digit",
            field="id",
        )
    return value


def check_group_name(value: str, field_name: str = "group") -> str:
    if not GROUP_NAME_RE.fullmatch(value):
        raise InvalidRequest(
            f"group name {value[:80]!r} must be 1-63 lowercase letters, digits, '.', '_' or '-'",
            field=field_name,
        )
    return value


def check_attributes(attributes: Mapping[str, str], field_name: str = "attributes") -> None:
    if len(attributes) > MAX_ATTRIBUTES:
        raise InvalidRequest(f"at most {MAX_ATTRIBUTES} attributes per device", field=field_name)
    for key, value in attributes.items():
        if not ATTRIBUTE_KEY_RE.fullmatch(key):
            raise InvalidRequest(
                f"attribute key {key[:80]!r} must be lowercase letters, digits and '_', "
                "starting with a letter",
                field=f"{field_name}.{key[:80]}",
            )
        if not isinstance(value, str) or len(value) > MAX_ATTRIBUTE_VALUE_CHARS:
            raise InvalidRequest(
                f"attribute {key} must be a string of at most "
                f"{MAX_ATTRIBUTE_VALUE_CHARS} characters",
                field=f"{field_name}.{key}",
            )


def check_routes(routes: object, field_name: str = "routes") -> None:
    """Listener name -> destination name; whether both exist is the configuration's business."""
    if not isinstance(routes, Mapping):
        raise InvalidRequest(
            "routes must be an object of listener name -> destination name", field=field_name
        )
    if len(routes) > MAX_ROUTES:
        raise InvalidRequest(f"at most {MAX_ROUTES} routes", field=field_name)
    for key, value in routes.items():
        if not isinstance(key, str) or not ROUTE_NAME_RE.fullmatch(key):
            raise InvalidRequest(
                f"listener name {str(key)[:80]!r} must be 1-63 lowercase letters, digits, '_' "
                "or '-', starting with a letter",
                field=f"{field_name}.{str(key)[:80]}",
            )
        if not isinstance(value, str) or not ROUTE_NAME_RE.fullmatch(value):
            raise InvalidRequest(
                f"destination name {str(value)[:80]!r} for listener {key} must be 1-63 lowercase "
                "letters, digits, '_' or '-', starting with a letter",
                field=f"{field_name}.{key}",
            )


def normalize_address(value: str, field_name: str = "addresses") -> str:
    """One canonical text per IP address, so ``::ffff:10.0.0.1`` and ``10.0.0.1`` collide."""
    try:
        address = ipaddress.ip_address(value.strip())
    except ValueError:
        raise InvalidRequest(
            f"{value[:80]!r} is not an IPv4 or IPv6 address", field=field_name
        ) from None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address)


def normalize_addresses(values: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    if len(values) > MAX_ADDRESSES:
        raise InvalidRequest(f"at most {MAX_ADDRESSES} addresses per device", field="addresses")
    normalized = tuple(sorted({normalize_address(v) for v in values}))
    return normalized
