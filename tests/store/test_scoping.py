"""Roles and group scopes applied by the services, on both backends."""

from __future__ import annotations

import pytest

from fleetgate.errors import Forbidden, NotFound
from fleetgate.records import Role
from fleetgate.services.context import SYSTEM_CALLER
from fleetgate.services.devices import DevicePatch, DeviceQuery, DeviceService, NewDevice
from fleetgate.services.groups import GroupService
from fleetgate.store import Database

from .helpers import caller, count

VIEWER = caller(Role.VIEWER)
OPERATOR_A = caller(Role.OPERATOR, "a")
ADMIN_A = caller(Role.ADMIN, "a")


@pytest.fixture
async def two_groups(devices: DeviceService, groups: GroupService) -> None:
    for name in ("a", "b"):
        await groups.create(SYSTEM_CALLER, name, f"group {name}", {})
    for device_id, group in (("a-1", "a"), ("a-2", "a"), ("b-1", "b"), ("d-1", "default")):
        await devices.create(SYSTEM_CALLER, NewDevice(id=device_id, group=group))


@pytest.mark.usefixtures("two_groups")
async def test_viewer_reads_but_cannot_change(devices: DeviceService, db: Database) -> None:
    with pytest.raises(Forbidden, match="viewer"):
        await devices.create(VIEWER, NewDevice(id="new"))
    with pytest.raises(Forbidden):
        await devices.update(VIEWER, "a-1", DevicePatch(name="x"))
    with pytest.raises(Forbidden):
        await devices.delete(VIEWER, "a-1")
    assert (await devices.get(VIEWER, "a-1")).name == "a-1"
    page = await devices.list(VIEWER, DeviceQuery(), limit=100, cursor=None)
    assert [d.id for d in page.items] == ["a-1", "a-2", "b-1", "d-1"]
    assert await count(db, "devices") == 4
    assert await count(db, "audit_log") == 6  # 2 groups + 4 devices, nothing from the viewer


@pytest.mark.usefixtures("two_groups")
async def test_scoped_operator_writes_only_in_its_groups(
    devices: DeviceService, db: Database
) -> None:
    created = await devices.create(OPERATOR_A, NewDevice(id="a-3", group="a"))
    assert created.group == "a"
    with pytest.raises(Forbidden, match="limited to groups a"):
        await devices.create(OPERATOR_A, NewDevice(id="b-2", group="b"))
    with pytest.raises(Forbidden):
        await devices.create(OPERATOR_A, NewDevice(id="d-2"))  # "default" is another group
    with pytest.raises(Forbidden):
        await devices.update(OPERATOR_A, "b-1", DevicePatch(name="x"))
    with pytest.raises(Forbidden):
        await devices.delete(OPERATOR_A, "b-1")
    # Moving a device out of scope is writing in another group.
    with pytest.raises(Forbidden):
        await devices.update(OPERATOR_A, "a-1", DevicePatch(group="b"))
    assert (await devices.get(SYSTEM_CALLER, "a-1")).group == "a"
    assert (await devices.get(SYSTEM_CALLER, "b-1")).name == "b-1"

    await devices.update(OPERATOR_A, "a-1", DevicePatch(name="renamed"))
    await devices.delete(OPERATOR_A, "a-2")
    everything = await devices.list(SYSTEM_CALLER, DeviceQuery(), limit=100, cursor=None)
    assert [d.id for d in everything.items] == ["a-1", "a-3", "b-1", "d-1"]
    assert (await devices.get(SYSTEM_CALLER, "a-1")).name == "renamed"


@pytest.mark.usefixtures("two_groups")
async def test_scoped_list_shows_only_the_scope(devices: DeviceService) -> None:
    page = await devices.list(OPERATOR_A, DeviceQuery(), limit=100, cursor=None)
    assert [d.id for d in page.items] == ["a-1", "a-2"]
    # Asking for another group by name does not widen the scope.
    other = await devices.list(OPERATOR_A, DeviceQuery(group="b"), limit=100, cursor=None)
    assert other.items == []
    # Nor does looking a device up by one of its identities.
    await devices.update(SYSTEM_CALLER, "b-1", DevicePatch(addresses=("10.9.9.9",)))
    by_address = await devices.list(
        OPERATOR_A, DeviceQuery(address="10.9.9.9"), limit=100, cursor=None
    )
    assert by_address.items == []


@pytest.mark.usefixtures("two_groups")
async def test_scoped_pagination_stays_in_scope(devices: DeviceService) -> None:
    for n in range(5):
        await devices.create(SYSTEM_CALLER, NewDevice(id=f"a-x{n}", group="a"))
        await devices.create(SYSTEM_CALLER, NewDevice(id=f"b-x{n}", group="b"))
    seen: list[str] = []
    cursor: str | None = None
    for _ in range(10):
        page = await devices.list(OPERATOR_A, DeviceQuery(), limit=2, cursor=cursor)
        seen.extend(d.id for d in page.items)
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == ["a-1", "a-2", "a-x0", "a-x1", "a-x2", "a-x3", "a-x4"]


@pytest.mark.usefixtures("two_groups")
async def test_get_outside_the_scope_looks_absent(devices: DeviceService) -> None:
    assert (await devices.get(OPERATOR_A, "a-1")).group == "a"
    # Not found, not forbidden: a scoped token learns nothing about other groups' devices.
    with pytest.raises(NotFound):
        await devices.get(OPERATOR_A, "b-1")
    with pytest.raises(NotFound):
        await devices.get(caller(Role.VIEWER, "b"), "a-1")


@pytest.mark.usefixtures("two_groups")
async def test_scoped_admin_manages_devices_in_scope_but_not_groups(
    devices: DeviceService, groups: GroupService
) -> None:
    await devices.create(ADMIN_A, NewDevice(id="a-9", group="a"))
    with pytest.raises(Forbidden):
        await devices.create(ADMIN_A, NewDevice(id="b-9", group="b"))
    with pytest.raises(Forbidden):
        await groups.create(ADMIN_A, "c", "", {})
    with pytest.raises(Forbidden):
        await groups.delete(ADMIN_A, "a")
    with pytest.raises(Forbidden):
        await groups.get(ADMIN_A, "b")
    updated = await groups.update(ADMIN_A, "a", description="mine", settings=None)
    assert updated.description == "mine"
    with pytest.raises(Forbidden):
        await groups.update(ADMIN_A, "b", description="theirs", settings=None)
    listed = await groups.list(ADMIN_A, limit=100, cursor=None)
    assert [g.name for g in listed.items] == ["a"]


@pytest.mark.usefixtures("two_groups")
async def test_operator_cannot_manage_groups(groups: GroupService) -> None:
    operator = caller(Role.OPERATOR)
    with pytest.raises(Forbidden):
        await groups.create(operator, "c", "", {})
    with pytest.raises(Forbidden):
        await groups.update(operator, "a", description="x", settings=None)
    with pytest.raises(Forbidden):
        await groups.delete(operator, "a")
