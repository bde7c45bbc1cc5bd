"""Wire shapes of the /v1 API. Requests reject unknown fields; responses mirror records."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from fleetgate.records import (
    DEFAULT_GROUP,
    MAX_ADDRESSES,
    MAX_NAME_CHARS,
    MAX_ROUTES,
    ApiToken,
    AuditEntry,
    Device,
    DeviceStatus,
    Group,
    Role,
)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


ROUTES_DESCRIPTION = (
    "Listener name -> destination name. On that listener this device's connections go to that "
    "destination, overriding its group's settings.routes and the listener's destination. "
    f"At most {MAX_ROUTES}; names as in the configuration ([a-z][a-z0-9_-]{{0,62}})."
)


class DeviceIn(Strict):
    id: str = Field(max_length=128, examples=["sensor-0001"])
    name: str | None = Field(default=None, max_length=MAX_NAME_CHARS)
    group: str = DEFAULT_GROUP
    status: DeviceStatus = DeviceStatus.ENABLED
    attributes: dict[str, str] = Field(
        default_factory=dict, examples=[{"imsi": "440103123456789", "model": "env-v2"}]
    )
    addresses: list[str] = Field(
        default_factory=list, max_length=MAX_ADDRESSES, examples=[["10.20.0.17"]]
    )
    routes: dict[str, str] = Field(
        default_factory=dict, description=ROUTES_DESCRIPTION, examples=[{"mqtt": "aws-iot"}]
    )


class DevicePatchIn(Strict):
    name: str | None = Field(default=None, max_length=MAX_NAME_CHARS)
    group: str | None = None
    status: DeviceStatus | None = None
    attributes: dict[str, str | None] | None = Field(
        default=None, description="Merged into the current attributes; null removes a key."
    )
    addresses: list[str] | None = Field(
        default=None, max_length=MAX_ADDRESSES, description="Replaces the address list."
    )
    routes: dict[str, str | None] | None = Field(
        default=None,
        description="Merged into the current routes; null removes a listener's route. "
        + ROUTES_DESCRIPTION,
    )


class DeviceOut(BaseModel):
    id: str
    name: str
    group: str
    status: DeviceStatus
    attributes: dict[str, str]
    addresses: list[str]
    routes: dict[str, str] = Field(description=ROUTES_DESCRIPTION)
    created_at: datetime
    updated_at: datetime
    revision: int

    @classmethod
    def of(cls, device: Device) -> DeviceOut:
        return cls(
            id=device.id,
            name=device.name,
            group=device.group,
            status=device.status,
            attributes=dict(device.attributes),
            addresses=list(device.addresses),
            routes=dict(device.routes),
            created_at=device.created_at,
            updated_at=device.updated_at,
            revision=device.revision,
        )


class DevicePage(BaseModel):
    items: list[DeviceOut]
    next_cursor: str | None


class GroupIn(Strict):
    name: str = Field(max_length=63, examples=["tokyo-plant"])
    description: str = ""
    settings: dict[str, Any] = Field(default_factory=dict)


class GroupPatchIn(Strict):
    description: str | None = None
    settings: dict[str, Any] | None = Field(default=None, description="Replaces the settings.")


class GroupOut(BaseModel):
    name: str
    description: str
    settings: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    revision: int

    @classmethod
    def of(cls, group: Group) -> GroupOut:
        return cls(
            name=group.name,
            description=group.description,
            settings=dict(group.settings),
            created_at=group.created_at,
            updated_at=group.updated_at,
            revision=group.revision,
        )


class GroupPage(BaseModel):
    items: list[GroupOut]
    next_cursor: str | None


class TokenIn(Strict):
    name: str = Field(max_length=100, examples=["ci-deployer"])
    role: Role
    groups: list[str] = Field(
        default_factory=list, max_length=100, description="Empty: every group."
    )
    expires_at: datetime | None = None
    expires_in_s: int | None = Field(default=None, gt=0, le=10 * 365 * 86400)


class TokenOut(BaseModel):
    id: str
    name: str
    role: Role
    groups: list[str]
    created_at: datetime
    expires_at: datetime | None
    created_by: str

    @classmethod
    def of(cls, token: ApiToken) -> TokenOut:
        return cls(
            id=token.id,
            name=token.name,
            role=token.role,
            groups=list(token.groups),
            created_at=token.created_at,
            expires_at=token.expires_at,
            created_by=token.created_by,
        )


class TokenCreated(BaseModel):
    token: TokenOut
    secret: str = Field(description="The bearer string. Shown in this answer only; store it now.")


class TokenPage(BaseModel):
    items: list[TokenOut]
    next_cursor: str | None


class WhoAmI(BaseModel):
    token_id: str
    name: str
    role: Role
    groups: list[str]


class AuditOut(BaseModel):
    id: int
    at: datetime
    actor: str
    action: str
    target_type: str
    target_id: str
    group: str | None
    request_id: str | None
    source: str | None
    before: dict[str, Any] | None
    after: dict[str, Any] | None

    @classmethod
    def of(cls, entry: AuditEntry) -> AuditOut:
        return cls(
            id=entry.id,
            at=entry.at,
            actor=entry.actor,
            action=entry.action,
            target_type=entry.target_type,
            target_id=entry.target_id,
            group=entry.group,
            request_id=entry.request_id,
            source=entry.source,
            before=dict(entry.before) if entry.before is not None else None,
            after=dict(entry.after) if entry.after is not None else None,
        )


class AuditPage(BaseModel):
    items: list[AuditOut]
    next_cursor: str | None


class Problem(BaseModel):
    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None
    request_id: str | None = None
    errors: list[dict[str, str]] | None = None
