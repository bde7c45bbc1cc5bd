"""Groups through GroupService, on both backends."""

from __future__ import annotations

import pytest

from fleetgate.clock import FakeClock
from fleetgate.errors import Conflict, InvalidRequest, NotFound, PreconditionFailed
from fleetgate.services.context import SYSTEM_CALLER
from fleetgate.services.devices import DevicePatch, DeviceService, NewDevice
from fleetgate.services.groups import GroupService
from fleetgate.store import Database

from .helpers import count


async def test_default_group_exists_once(groups: GroupService, db: Database) -> None:
    await groups.ensure_default()  # idempotent
    default = await groups.get(SYSTEM_CALLER, "default")
    assert default.revision == 1
    assert await count(db, "groups") == 1
    assert await count(db, "audit_log") == 0  # ensuring the default is not a change by anyone


async def test_create_get_update_delete(groups: GroupService, clock: FakeClock) -> None:
    created = await groups.create(SYSTEM_CALLER, "field", "Field units", {"mtu": 1400, "x": [1]})
    assert created.revision == 1
    assert await groups.get(SYSTEM_CALLER, "field") == created
    assert dict(created.settings) == {"mtu": 1400, "x": [1]}

    clock.advance(1)
    updated = await groups.update(
        SYSTEM_CALLER, "field", description="Field", settings=None, if_revision=1
    )
    assert (updated.description, dict(updated.settings)) == ("Field", {"mtu": 1400, "x": [1]})
    assert updated.revision == 2
    assert updated.updated_at == clock.now()
    assert updated.created_at == created.created_at
    assert await groups.get(SYSTEM_CALLER, "field") == updated

    replaced = await groups.update(SYSTEM_CALLER, "field", description=None, settings={"a": "b"})
    assert (replaced.description, dict(replaced.settings), replaced.revision) == (
        "Field",
        {"a": "b"},
        3,
    )

    await groups.delete(SYSTEM_CALLER, "field")
    with pytest.raises(NotFound):
        await groups.get(SYSTEM_CALLER, "field")
    with pytest.raises(NotFound):
        await groups.delete(SYSTEM_CALLER, "field")
    with pytest.raises(NotFound):
        await groups.update(SYSTEM_CALLER, "field", description="x", settings=None)


async def test_duplicate_group_is_a_conflict(groups: GroupService, db: Database) -> None:
    await groups.create(SYSTEM_CALLER, "field", "first", {})
    with pytest.raises(Conflict, match="already exists"):
        await groups.create(SYSTEM_CALLER, "field", "second", {})
    with pytest.raises(Conflict):
        await groups.create(SYSTEM_CALLER, "default", "again", {})
    assert (await groups.get(SYSTEM_CALLER, "field")).description == "first"
    assert await count(db, "audit_log") == 1


async def test_invalid_group_name_is_refused(groups: GroupService) -> None:
    with pytest.raises(InvalidRequest):
        await groups.create(SYSTEM_CALLER, "Not Valid", "", {})


async def test_if_revision_mismatch_is_precondition_failed(groups: GroupService) -> None:
    await groups.create(SYSTEM_CALLER, "field", "", {})
    with pytest.raises(PreconditionFailed):
        await groups.update(SYSTEM_CALLER, "field", description="x", settings=None, if_revision=2)
    assert (await groups.get(SYSTEM_CALLER, "field")).revision == 1


async def test_deleting_a_group_with_devices_is_a_conflict(
    groups: GroupService, devices: DeviceService
) -> None:
    await groups.create(SYSTEM_CALLER, "field", "", {})
    await devices.create(SYSTEM_CALLER, NewDevice(id="dev-1", group="field"))
    with pytest.raises(Conflict, match="1 device"):
        await groups.delete(SYSTEM_CALLER, "field")
    assert (await groups.get(SYSTEM_CALLER, "field")).name == "field"

    await devices.update(SYSTEM_CALLER, "dev-1", DevicePatch(group="default"))
    await groups.delete(SYSTEM_CALLER, "field")
    with pytest.raises(NotFound):
        await groups.get(SYSTEM_CALLER, "field")


async def test_default_group_cannot_be_deleted(groups: GroupService) -> None:
    with pytest.raises(Conflict):
        await groups.delete(SYSTEM_CALLER, "default")
    assert (await groups.get(SYSTEM_CALLER, "default")).name == "default"


async def test_list_is_ordered_and_paged(groups: GroupService) -> None:
    names = [f"g{n:02d}" for n in range(7)]
    for name in reversed(names):
        await groups.create(SYSTEM_CALLER, name, "", {})
    seen: list[str] = []
    cursor: str | None = None
    for _ in range(10):
        page = await groups.list(SYSTEM_CALLER, limit=3, cursor=cursor)
        seen.extend(g.name for g in page.items)
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == ["default", *names]
