"""Group use cases."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from fleetgate.auth.authz import require_admin, require_group, require_unscoped_admin
from fleetgate.clock import Clock
from fleetgate.errors import Conflict, InvalidRequest, NotFound, PreconditionFailed
from fleetgate.records import (
    DEFAULT_GROUP,
    Group,
    NewAuditEntry,
    Page,
    check_group_name,
    check_routes,
)
from fleetgate.remote.records import MAX_SESSION_PORTS, valid_session_ports
from fleetgate.services.context import Caller, check_limit, decode_cursor, encode_cursor
from fleetgate.store import Database
from fleetgate.store.audit import AuditRepo
from fleetgate.store.devices import DeviceRepo
from fleetgate.store.groups import GroupRepo

MAX_SETTINGS_BYTES = 64 * 1024
MAX_DESCRIPTION_CHARS = 1000


def group_snapshot(group: Group) -> dict[str, Any]:
    return {
        "name": group.name,
        "description": group.description,
        "settings": dict(group.settings),
        "revision": group.revision,
    }


def _check_settings(settings: Mapping[str, Any]) -> None:
    """Free-form, except ``routes``: the data path reads it as listener -> destination."""
    if len(json.dumps(settings)) > MAX_SETTINGS_BYTES:
        raise InvalidRequest(f"settings exceed {MAX_SETTINGS_BYTES} bytes", field="settings")
    if "routes" in settings:
        check_routes(settings["routes"], "settings.routes")
    if "session_ports" in settings and not valid_session_ports(settings["session_ports"]):
        raise InvalidRequest(
            f"settings.session_ports must be a list of at most {MAX_SESSION_PORTS} port "
            "numbers (1-65535), e.g. [22, 5900]",
            field="settings.session_ports",
        )


def _check_description(description: str) -> None:
    if len(description) > MAX_DESCRIPTION_CHARS:
        raise InvalidRequest(
            f"description exceeds {MAX_DESCRIPTION_CHARS} characters", field="description"
        )


class GroupService:
    def __init__(self, db: Database, clock: Clock) -> None:
        self._db = db
        self._clock = clock

    async def ensure_default(self) -> None:
        now = self._clock.now()
        async with self._db.transaction() as tx:
            await GroupRepo(tx).insert(
                Group(DEFAULT_GROUP, "Devices not placed in another group", {}, now, now, 1),
                if_absent=True,
            )

    async def create(
        self, caller: Caller, name: str, description: str, settings: Mapping[str, Any]
    ) -> Group:
        check_group_name(name, "name")
        _check_description(description)
        _check_settings(settings)
        require_unscoped_admin(caller.principal, "creating a group")
        now = self._clock.now()
        group = Group(name, description, dict(settings), now, now, 1)
        async with self._db.transaction() as tx:
            if not await GroupRepo(tx).insert(group, if_absent=True):
                raise Conflict(f"group {name} already exists", field="name")
            await AuditRepo(tx).append(
                self._audit(caller, "group.create", group, None, group_snapshot(group)), now
            )
        return group

    async def get(self, caller: Caller, name: str) -> Group:
        require_group(caller.principal, name)
        async with self._db.snapshot() as tx:
            group = await GroupRepo(tx).get(name)
        if group is None:
            raise NotFound(f"group {name} does not exist")
        return group

    async def list(self, caller: Caller, *, limit: int, cursor: str | None) -> Page[Group]:
        check_limit(limit)
        async with self._db.snapshot() as tx:
            items = await GroupRepo(tx).list(
                limit=limit + 1,
                after=decode_cursor(cursor),
                within=caller.principal.visible_groups(),
            )
        more = len(items) > limit
        items = items[:limit]
        return Page(items=items, next_cursor=encode_cursor(items[-1].name) if more else None)

    async def update(
        self,
        caller: Caller,
        name: str,
        *,
        description: str | None,
        settings: Mapping[str, Any] | None,
        if_revision: int | None = None,
    ) -> Group:
        require_admin(caller.principal)
        require_group(caller.principal, name)
        if description is not None:
            _check_description(description)
        if settings is not None:
            _check_settings(settings)
        async with self._db.transaction() as tx:
            repo = GroupRepo(tx)
            current = await repo.get(name)
            if current is None:
                raise NotFound(f"group {name} does not exist")
            if if_revision is not None and if_revision != current.revision:
                raise PreconditionFailed(
                    f"group {name} is at revision {current.revision}, not {if_revision}"
                )
            updated = replace(
                current,
                description=description if description is not None else current.description,
                settings=dict(settings) if settings is not None else current.settings,
                updated_at=self._clock.now(),
                revision=current.revision + 1,
            )
            if not await repo.replace(updated, expected_revision=current.revision):
                raise PreconditionFailed(f"group {name} changed while it was being updated")
            await AuditRepo(tx).append(
                self._audit(
                    caller,
                    "group.update",
                    updated,
                    group_snapshot(current),
                    group_snapshot(updated),
                ),
                updated.updated_at,
            )
        return updated

    async def delete(self, caller: Caller, name: str) -> None:
        require_unscoped_admin(caller.principal, "deleting a group")
        if name == DEFAULT_GROUP:
            raise Conflict(f"group {DEFAULT_GROUP} holds new devices and cannot be deleted")
        async with self._db.transaction() as tx:
            repo = GroupRepo(tx)
            current = await repo.get(name)
            if current is None:
                raise NotFound(f"group {name} does not exist")
            members = await DeviceRepo(tx).count_in_group(name)
            if members:
                raise Conflict(f"group {name} still has {members} device(s); move or delete them")
            await repo.delete(name)
            await AuditRepo(tx).append(
                self._audit(caller, "group.delete", current, group_snapshot(current), None),
                self._clock.now(),
            )

    @staticmethod
    def _audit(
        caller: Caller,
        action: str,
        group: Group,
        before: dict[str, Any] | None,
        after: dict[str, Any] | None,
    ) -> NewAuditEntry:
        return NewAuditEntry(
            actor=caller.principal.actor,
            action=action,
            target_type="group",
            target_id=group.name,
            group=group.name,
            request_id=caller.request_id,
            source=caller.source,
            before=before,
            after=after,
        )
