"""The audit log: one entry per change, written in the change's transaction, and append-only."""

from __future__ import annotations

from datetime import timedelta

import pytest

from fleetgate.clock import FakeClock
from fleetgate.errors import Conflict, Forbidden, NotFound, PreconditionFailed, Unauthenticated
from fleetgate.records import DeviceStatus, Role
from fleetgate.sealing import Secret
from fleetgate.services.audit import AuditService
from fleetgate.services.context import SYSTEM_CALLER
from fleetgate.services.devices import DevicePatch, DeviceService, NewDevice
from fleetgate.services.groups import GroupService
from fleetgate.services.tokens import TokenService
from fleetgate.store import Database, IntegrityViolation
from fleetgate.store.audit import AuditFilter

from .helpers import audit_entries, caller, count, fail_audit_appends, rows

ADMIN = caller(Role.ADMIN, token_id="tok_admin")


async def test_every_change_is_audited_with_actor_target_and_before_after(
    devices: DeviceService,
    groups: GroupService,
    tokens: TokenService,
    audit: AuditService,
    clock: FakeClock,
) -> None:
    await groups.create(ADMIN, "field", "Field", {"mtu": 1400})
    clock.advance(1)
    await devices.create(
        ADMIN,
        NewDevice(id="dev-1", group="field", attributes={"model": "x"}, addresses=("10.0.0.1",)),
    )
    clock.advance(1)
    await devices.update(ADMIN, "dev-1", DevicePatch(status=DeviceStatus.DISABLED))
    clock.advance(1)
    await devices.delete(ADMIN, "dev-1")
    await groups.update(ADMIN, "field", description="F", settings=None)
    token, _ = await tokens.create(
        ADMIN, name="ci", role=Role.VIEWER, groups=("field",), expires_at=None
    )
    await tokens.delete(ADMIN, token.id)
    await groups.delete(ADMIN, "field")

    page = await audit.list(SYSTEM_CALLER, AuditFilter(), limit=100, cursor=None)
    entries = page.items
    assert page.next_cursor is None
    assert [(e.action, e.target_type, e.target_id) for e in entries] == [
        ("group.delete", "group", "field"),
        ("token.delete", "token", token.id),
        ("token.create", "token", token.id),
        ("group.update", "group", "field"),
        ("device.delete", "device", "dev-1"),
        ("device.update", "device", "dev-1"),
        ("device.create", "device", "dev-1"),
        ("group.create", "group", "field"),
    ]
    for entry in entries:
        assert entry.actor == "token:tok_admin"
        assert entry.request_id == "req-tok_admin"
        assert entry.source == "203.0.113.7"
        assert entry.group == "field"
    ids = [e.id for e in entries]
    assert ids == sorted(ids, reverse=True)
    assert len(set(ids)) == len(ids)

    by_action = {e.action: e for e in entries}
    created = by_action["device.create"]
    assert created.before is None
    assert created.after == {
        "id": "dev-1",
        "name": "dev-1",
        "group": "field",
        "status": "enabled",
        "attributes": {"model": "x"},
        "addresses": ["10.0.0.1"],
        "routes": {},
        "revision": 1,
    }
    assert created.at == clock.now() - timedelta(seconds=2)
    updated = by_action["device.update"]
    assert updated.before == created.after
    assert updated.after == {**created.after, "status": "disabled", "revision": 2}
    deleted = by_action["device.delete"]
    assert deleted.before == updated.after
    assert deleted.after is None
    assert by_action["group.update"].before is not None
    assert by_action["group.update"].after == {
        "name": "field",
        "description": "F",
        "settings": {"mtu": 1400},
        "revision": 2,
    }
    assert by_action["token.create"].after == {
        "id": token.id,
        "name": "ci",
        "role": "viewer",
        "groups": ["field"],
        "expires_at": None,
    }
    assert by_action["token.delete"].before == by_action["token.create"].after
    assert by_action["token.delete"].after is None


async def test_entries_are_newest_first_with_cursor_paging(
    devices: DeviceService, audit: AuditService
) -> None:
    for n in range(7):
        await devices.create(SYSTEM_CALLER, NewDevice(id=f"dev-{n}"))
    seen: list[str] = []
    sizes: list[int] = []
    cursor: str | None = None
    for _ in range(10):
        page = await audit.list(SYSTEM_CALLER, AuditFilter(), limit=3, cursor=cursor)
        sizes.append(len(page.items))
        seen.extend(e.target_id for e in page.items)
        cursor = page.next_cursor
        if cursor is None:
            break
    assert sizes == [3, 3, 1]
    assert seen == [f"dev-{n}" for n in reversed(range(7))]


async def test_filters(
    devices: DeviceService, groups: GroupService, audit: AuditService, clock: FakeClock
) -> None:
    start = clock.now()
    await devices.create(SYSTEM_CALLER, NewDevice(id="dev-1"))
    clock.advance(10)
    await devices.create(ADMIN, NewDevice(id="dev-2"))
    await devices.update(ADMIN, "dev-2", DevicePatch(name="two"))
    await groups.create(ADMIN, "field", "", {})

    async def ids(query: AuditFilter) -> list[tuple[str, str]]:
        page = await audit.list(SYSTEM_CALLER, query, limit=100, cursor=None)
        return [(e.action, e.target_id) for e in page.items]

    assert await ids(AuditFilter(action="device.create")) == [
        ("device.create", "dev-2"),
        ("device.create", "dev-1"),
    ]
    assert await ids(AuditFilter(target_type="device", target_id="dev-2")) == [
        ("device.update", "dev-2"),
        ("device.create", "dev-2"),
    ]
    assert await ids(AuditFilter(actor="token:system")) == [("device.create", "dev-1")]
    assert await ids(AuditFilter(until=start + timedelta(seconds=10))) == [
        ("device.create", "dev-1")
    ]
    assert len(await ids(AuditFilter(since=start + timedelta(seconds=10)))) == 3
    assert await ids(AuditFilter(target_type="group")) == [("group.create", "field")]


async def test_scoped_callers_see_only_their_groups(
    devices: DeviceService, groups: GroupService, audit: AuditService
) -> None:
    for name in ("a", "b"):
        await groups.create(SYSTEM_CALLER, name, "", {})
        await devices.create(SYSTEM_CALLER, NewDevice(id=f"{name}-1", group=name))
    page = await audit.list(caller(Role.VIEWER, "a"), AuditFilter(), limit=100, cursor=None)
    assert [(e.action, e.target_id) for e in page.items] == [
        ("device.create", "a-1"),
        ("group.create", "a"),
    ]


async def test_audit_log_refuses_update_and_delete(devices: DeviceService, db: Database) -> None:
    await devices.create(SYSTEM_CALLER, NewDevice(id="dev-1"))
    before = await rows(db, "audit_log")
    assert len(before) == 1

    with pytest.raises(IntegrityViolation, match="append-only"):
        async with db.transaction() as tx:
            await tx.execute(
                "UPDATE audit_log SET actor = ? WHERE id = ?", "forger", before[0]["id"]
            )
    with pytest.raises(IntegrityViolation, match="append-only"):
        async with db.transaction() as tx:
            await tx.execute("DELETE FROM audit_log WHERE id = ?", before[0]["id"])
    with pytest.raises(IntegrityViolation, match="append-only"):
        async with db.transaction() as tx:
            await tx.execute("DELETE FROM audit_log")

    assert await rows(db, "audit_log") == before
    # The store is still usable after the refused statements.
    await devices.create(SYSTEM_CALLER, NewDevice(id="dev-2"))
    assert await count(db, "audit_log") == 2


async def test_failed_changes_leave_no_entry(
    devices: DeviceService, groups: GroupService, tokens: TokenService, db: Database
) -> None:
    await devices.create(SYSTEM_CALLER, NewDevice(id="dev-1", addresses=("10.0.0.1",)))
    await groups.create(SYSTEM_CALLER, "field", "", {})
    baseline = await count(db, "audit_log")

    with pytest.raises(Conflict):
        await devices.create(SYSTEM_CALLER, NewDevice(id="dev-1"))
    with pytest.raises(Conflict):
        await devices.create(SYSTEM_CALLER, NewDevice(id="dev-2", addresses=("10.0.0.1",)))
    with pytest.raises(NotFound):
        await devices.create(SYSTEM_CALLER, NewDevice(id="dev-3", group="nowhere"))
    with pytest.raises(Forbidden):
        await devices.create(caller(Role.VIEWER), NewDevice(id="dev-4"))
    with pytest.raises(PreconditionFailed):
        await devices.update(SYSTEM_CALLER, "dev-1", DevicePatch(name="x"), if_revision=7)
    with pytest.raises(NotFound):
        await devices.delete(SYSTEM_CALLER, "ghost")
    with pytest.raises(Conflict):
        await groups.create(SYSTEM_CALLER, "field", "", {})
    with pytest.raises(Conflict):
        await groups.delete(SYSTEM_CALLER, "default")
    with pytest.raises(NotFound):
        await tokens.create(
            SYSTEM_CALLER, name="x", role=Role.VIEWER, groups=("nowhere",), expires_at=None
        )

    assert await count(db, "audit_log") == baseline
    assert await count(db, "devices") == 1


async def test_device_change_and_its_entry_commit_together(
    devices: DeviceService, db: Database
) -> None:
    """With the audit append refused, the device change must roll back with it."""
    await devices.create(SYSTEM_CALLER, NewDevice(id="dev-1", addresses=("10.0.0.1",)))
    original = await devices.get(SYSTEM_CALLER, "dev-1")
    for action in ("device.create", "device.update", "device.delete"):
        await fail_audit_appends(db, action)
        if action == "device.create":
            with pytest.raises((IntegrityViolation, Conflict)):
                await devices.create(SYSTEM_CALLER, NewDevice(id="dev-2", addresses=("10.0.0.2",)))
            assert await devices.find_by_address("10.0.0.2") is None
            with pytest.raises(NotFound):
                await devices.get(SYSTEM_CALLER, "dev-2")
        elif action == "device.update":
            with pytest.raises((IntegrityViolation, Conflict)):
                await devices.update(
                    SYSTEM_CALLER, "dev-1", DevicePatch(name="x", addresses=("10.0.0.3",))
                )
        else:
            with pytest.raises(IntegrityViolation):
                await devices.delete(SYSTEM_CALLER, "dev-1")
        assert await devices.get(SYSTEM_CALLER, "dev-1") == original
        assert await count(db, "audit_log") == 1
        await _drop_refusal(db)


async def test_group_and_token_changes_commit_with_their_entries(
    groups: GroupService, tokens: TokenService, db: Database
) -> None:
    await fail_audit_appends(db, "group.create")
    with pytest.raises(IntegrityViolation):
        await groups.create(SYSTEM_CALLER, "field", "", {})
    with pytest.raises(NotFound):
        await groups.get(SYSTEM_CALLER, "field")
    await _drop_refusal(db)

    await fail_audit_appends(db, "token.create")
    bearer_text = "fgt_refused-0123456789abcdef"
    with pytest.raises(IntegrityViolation):
        await tokens.create(
            SYSTEM_CALLER,
            name="x",
            role=Role.ADMIN,
            groups=(),
            expires_at=None,
            bearer=Secret(bearer_text),
        )
    with pytest.raises(Unauthenticated):
        await tokens.authenticate(bearer_text)
    assert await count(db, "api_tokens") == 0
    assert await count(db, "audit_log") == 0


async def _drop_refusal(db: Database) -> None:
    async with db.transaction() as tx:
        if tx.dialect == "sqlite":
            await tx.execute("DROP TRIGGER test_refuse_audit")
        else:
            await tx.execute(
                "DROP TRIGGER test_refuse_audit ON audit_log; DROP FUNCTION test_refuse_audit()"
            )


async def test_entries_read_straight_from_the_store_match_the_service(
    devices: DeviceService, audit: AuditService, db: Database
) -> None:
    await devices.create(ADMIN, NewDevice(id="dev-1"))
    (stored,) = await audit_entries(db)
    page = await audit.list(SYSTEM_CALLER, AuditFilter(), limit=10, cursor=None)
    assert page.items == [stored]
    (raw,) = await rows(db, "audit_log")
    assert raw["actor"] == "token:tok_admin"
    assert raw["group_name"] == "default"
    assert raw["before_json"] is None
