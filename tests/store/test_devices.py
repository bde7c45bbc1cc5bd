"""The device registry through DeviceService, identically on both backends."""

from __future__ import annotations

import pytest

from fleetgate.clock import FakeClock
from fleetgate.errors import Conflict, InvalidRequest, NotFound, PreconditionFailed
from fleetgate.records import Device, DeviceStatus
from fleetgate.services.context import SYSTEM_CALLER
from fleetgate.services.devices import DevicePatch, DeviceQuery, DeviceService, NewDevice
from fleetgate.services.groups import GroupService
from fleetgate.store import Database, IntegrityViolation

from .helpers import count, rows


async def all_devices(devices: DeviceService, query: DeviceQuery | None = None) -> list[Device]:
    page = await devices.list(SYSTEM_CALLER, query or DeviceQuery(), limit=500, cursor=None)
    assert page.next_cursor is None
    return page.items


# -- create / get / update / delete ---------------------------------------------------------------


async def test_create_then_get_returns_the_same_device(
    devices: DeviceService, clock: FakeClock
) -> None:
    created = await devices.create(
        SYSTEM_CALLER,
        NewDevice(
            id="dev-1",
            name="Pump 1",
            attributes={"model": "x1", "imsi": "001010123456789"},
            addresses=("10.0.0.1",),
        ),
    )
    assert created.name == "Pump 1"
    assert created.group == "default"
    assert created.status is DeviceStatus.ENABLED
    assert created.revision == 1
    assert created.created_at == created.updated_at == clock.now()

    fetched = await devices.get(SYSTEM_CALLER, "dev-1")
    assert fetched == created
    assert dict(fetched.attributes) == {"imsi": "001010123456789", "model": "x1"}
    assert fetched.addresses == ("10.0.0.1",)


async def test_name_defaults_to_the_id(devices: DeviceService) -> None:
    created = await devices.create(SYSTEM_CALLER, NewDevice(id="dev-1"))
    assert created.name == "dev-1"
    assert (await devices.get(SYSTEM_CALLER, "dev-1")).name == "dev-1"


async def test_get_unknown_device_is_not_found(devices: DeviceService) -> None:
    with pytest.raises(NotFound):
        await devices.get(SYSTEM_CALLER, "nope")


async def test_invalid_id_is_refused_before_touching_the_store(
    devices: DeviceService, db: Database
) -> None:
    with pytest.raises(InvalidRequest):
        await devices.create(SYSTEM_CALLER, NewDevice(id="-bad id"))
    assert await count(db, "devices") == 0


async def test_duplicate_id_is_a_conflict(devices: DeviceService, db: Database) -> None:
    await devices.create(SYSTEM_CALLER, NewDevice(id="dev-1", name="first"))
    with pytest.raises(Conflict, match="dev-1 already exists"):
        await devices.create(SYSTEM_CALLER, NewDevice(id="dev-1", name="second"))
    assert (await devices.get(SYSTEM_CALLER, "dev-1")).name == "first"
    assert await count(db, "devices") == 1


async def test_unknown_group_is_not_found(devices: DeviceService, db: Database) -> None:
    with pytest.raises(NotFound, match="group nowhere"):
        await devices.create(SYSTEM_CALLER, NewDevice(id="dev-1", group="nowhere"))
    assert await count(db, "devices") == 0


async def test_update_changes_fields_and_bumps_revision(
    devices: DeviceService, groups: GroupService, clock: FakeClock
) -> None:
    await groups.create(SYSTEM_CALLER, "field", "", {})
    created = await devices.create(SYSTEM_CALLER, NewDevice(id="dev-1"))
    clock.advance(5)

    updated = await devices.update(
        SYSTEM_CALLER,
        "dev-1",
        DevicePatch(name="renamed", group="field", status=DeviceStatus.DISABLED),
    )
    assert (updated.name, updated.group, updated.status) == (
        "renamed",
        "field",
        DeviceStatus.DISABLED,
    )
    assert updated.revision == 2
    assert updated.created_at == created.created_at
    assert updated.updated_at == clock.now()
    assert await devices.get(SYSTEM_CALLER, "dev-1") == updated


async def test_update_to_unknown_group_is_not_found(devices: DeviceService) -> None:
    await devices.create(SYSTEM_CALLER, NewDevice(id="dev-1"))
    with pytest.raises(NotFound):
        await devices.update(SYSTEM_CALLER, "dev-1", DevicePatch(group="nowhere"))
    assert (await devices.get(SYSTEM_CALLER, "dev-1")).group == "default"


async def test_update_unknown_device_is_not_found(devices: DeviceService) -> None:
    with pytest.raises(NotFound):
        await devices.update(SYSTEM_CALLER, "ghost", DevicePatch(name="x"))


async def test_update_that_changes_nothing_keeps_the_revision(
    devices: DeviceService, db: Database
) -> None:
    created = await devices.create(
        SYSTEM_CALLER,
        NewDevice(id="dev-1", attributes={"model": "x"}, addresses=("10.0.0.2", "10.0.0.1")),
    )
    same = await devices.update(
        SYSTEM_CALLER,
        "dev-1",
        DevicePatch(name="dev-1", attributes={"model": "x"}, addresses=("10.0.0.1", "10.0.0.2")),
    )
    assert same == created
    assert same.revision == 1
    assert await count(db, "audit_log") == 1  # the create only


async def test_attributes_merge_and_none_removes_a_key(devices: DeviceService) -> None:
    await devices.create(
        SYSTEM_CALLER, NewDevice(id="dev-1", attributes={"model": "x1", "firmware": "1.0"})
    )
    updated = await devices.update(
        SYSTEM_CALLER,
        "dev-1",
        DevicePatch(attributes={"firmware": "2.0", "model": None, "site": "north", "gone": None}),
    )
    assert dict(updated.attributes) == {"firmware": "2.0", "site": "north"}
    assert dict((await devices.get(SYSTEM_CALLER, "dev-1")).attributes) == {
        "firmware": "2.0",
        "site": "north",
    }
    # A patch without attributes leaves them alone.
    renamed = await devices.update(SYSTEM_CALLER, "dev-1", DevicePatch(name="n"))
    assert dict(renamed.attributes) == {"firmware": "2.0", "site": "north"}


async def test_if_revision_mismatch_is_precondition_failed(devices: DeviceService) -> None:
    await devices.create(SYSTEM_CALLER, NewDevice(id="dev-1"))
    updated = await devices.update(SYSTEM_CALLER, "dev-1", DevicePatch(name="a"), if_revision=1)
    assert updated.revision == 2

    with pytest.raises(PreconditionFailed):
        await devices.update(SYSTEM_CALLER, "dev-1", DevicePatch(name="b"), if_revision=1)
    with pytest.raises(PreconditionFailed):
        await devices.delete(SYSTEM_CALLER, "dev-1", if_revision=1)
    assert (await devices.get(SYSTEM_CALLER, "dev-1")).name == "a"

    await devices.delete(SYSTEM_CALLER, "dev-1", if_revision=2)
    with pytest.raises(NotFound):
        await devices.get(SYSTEM_CALLER, "dev-1")


async def test_delete_removes_the_device_and_its_children(
    devices: DeviceService, db: Database
) -> None:
    await devices.create(
        SYSTEM_CALLER,
        NewDevice(id="dev-1", attributes={"imei": "356938035643809"}, addresses=("10.0.0.1",)),
    )
    await devices.delete(SYSTEM_CALLER, "dev-1")
    with pytest.raises(NotFound):
        await devices.get(SYSTEM_CALLER, "dev-1")
    with pytest.raises(NotFound):
        await devices.delete(SYSTEM_CALLER, "dev-1")
    for table in ("devices", "device_attributes", "device_addresses"):
        assert await count(db, table) == 0, table
    # What the deleted device held is free again.
    again = await devices.create(
        SYSTEM_CALLER,
        NewDevice(id="dev-2", attributes={"imei": "356938035643809"}, addresses=("10.0.0.1",)),
    )
    assert await devices.find_by_address("10.0.0.1") == again


# -- addresses --------------------------------------------------------------------------------


async def test_addresses_are_normalized_deduplicated_and_sorted(devices: DeviceService) -> None:
    created = await devices.create(
        SYSTEM_CALLER,
        NewDevice(
            id="dev-1",
            addresses=("::ffff:10.0.0.1", " 10.0.0.9 ", "10.0.0.1", "FD00:0:0::1"),
        ),
    )
    assert created.addresses == ("10.0.0.1", "10.0.0.9", "fd00::1")
    assert (await devices.get(SYSTEM_CALLER, "dev-1")).addresses == created.addresses


async def test_address_order_read_back_matches_the_written_order(
    devices: DeviceService, db: Database
) -> None:
    """Addresses whose byte order differs from a natural-language collation's order."""
    created = await devices.create(
        SYSTEM_CALLER,
        NewDevice(id="dev-1", addresses=("12.0.0.1", "1.2.3.4", "fd00::a", "10.1.1.1")),
    )
    assert created.addresses == ("1.2.3.4", "10.1.1.1", "12.0.0.1", "fd00::a")
    assert (await devices.get(SYSTEM_CALLER, "dev-1")).addresses == created.addresses
    # Re-sending the same set is a no-op, not a new revision.
    same = await devices.update(
        SYSTEM_CALLER,
        "dev-1",
        DevicePatch(addresses=("fd00::a", "1.2.3.4", "12.0.0.1", "10.1.1.1")),
    )
    assert same.revision == 1
    assert await count(db, "audit_log") == 1


async def test_invalid_address_is_refused(devices: DeviceService, db: Database) -> None:
    with pytest.raises(InvalidRequest):
        await devices.create(SYSTEM_CALLER, NewDevice(id="dev-1", addresses=("10.0.0.300",)))
    assert await count(db, "devices") == 0


async def test_an_address_identifies_at_most_one_device(
    devices: DeviceService, db: Database
) -> None:
    await devices.create(SYSTEM_CALLER, NewDevice(id="owner", addresses=("10.0.0.1",)))

    # The same address in another spelling is the same address.
    with pytest.raises(Conflict, match="already identifies device owner") as info:
        await devices.create(
            SYSTEM_CALLER, NewDevice(id="intruder", addresses=("10.0.0.2", "::ffff:10.0.0.1"))
        )
    assert info.value.field == "addresses"
    assert [d.id for d in await all_devices(devices)] == ["owner"]
    assert await count(db, "device_addresses") == 1

    await devices.create(SYSTEM_CALLER, NewDevice(id="other", addresses=("10.0.0.2",)))
    with pytest.raises(Conflict, match="already identifies device owner"):
        await devices.update(SYSTEM_CALLER, "other", DevicePatch(addresses=("10.0.0.1",)))
    assert (await devices.get(SYSTEM_CALLER, "other")).addresses == ("10.0.0.2",)


async def test_readdressing_frees_the_old_address(devices: DeviceService) -> None:
    await devices.create(SYSTEM_CALLER, NewDevice(id="a", addresses=("10.0.0.1",)))
    await devices.update(SYSTEM_CALLER, "a", DevicePatch(addresses=("10.0.0.5",)))
    assert await devices.find_by_address("10.0.0.1") is None
    b = await devices.create(SYSTEM_CALLER, NewDevice(id="b", addresses=("10.0.0.1",)))
    assert await devices.find_by_address("10.0.0.1") == b
    a = await devices.find_by_address("10.0.0.5")
    assert a is not None
    assert a.id == "a"


async def test_find_by_address(devices: DeviceService) -> None:
    created = await devices.create(
        SYSTEM_CALLER, NewDevice(id="dev-1", addresses=("10.0.0.1", "2001:db8::1"))
    )
    assert await devices.find_by_address("10.0.0.1") == created
    assert await devices.find_by_address("::ffff:10.0.0.1") == created
    assert await devices.find_by_address("2001:DB8:0::1") == created
    assert await devices.find_by_address("10.0.0.2") is None


# -- identity attributes ----------------------------------------------------------------------


@pytest.mark.parametrize("key", ["imsi", "imei", "iccid", "serial"])
async def test_identity_attributes_are_unique_across_devices(
    devices: DeviceService, db: Database, key: str
) -> None:
    await devices.create(SYSTEM_CALLER, NewDevice(id="first", attributes={key: "123"}))
    with pytest.raises(Conflict, match="already belongs to device first") as info:
        await devices.create(SYSTEM_CALLER, NewDevice(id="second", attributes={key: "123"}))
    assert info.value.field == f"attributes.{key}"
    assert await count(db, "devices") == 1

    await devices.create(SYSTEM_CALLER, NewDevice(id="second", attributes={key: "456"}))
    with pytest.raises(Conflict, match="already belongs to device first"):
        await devices.update(SYSTEM_CALLER, "second", DevicePatch(attributes={key: "123"}))
    assert dict((await devices.get(SYSTEM_CALLER, "second")).attributes) == {key: "456"}


async def test_identity_uniqueness_is_enforced_by_the_store_itself(
    devices: DeviceService, db: Database
) -> None:
    """The partial unique index, not only the service's check, refuses a shared imsi."""
    await devices.create(SYSTEM_CALLER, NewDevice(id="first", attributes={"imsi": "1"}))
    await devices.create(SYSTEM_CALLER, NewDevice(id="second"))
    with pytest.raises(IntegrityViolation):
        async with db.transaction() as tx:
            await tx.execute(
                "INSERT INTO device_attributes (device_id, key, value) VALUES (?, ?, ?)",
                "second",
                "imsi",
                "1",
            )
    async with db.transaction() as tx:  # a non-identity key may repeat
        await tx.execute(
            "INSERT INTO device_attributes (device_id, key, value) VALUES (?, ?, ?)",
            "second",
            "model",
            "1",
        )
    assert len(await rows(db, "device_attributes")) == 2


async def test_ordinary_attributes_may_repeat(devices: DeviceService) -> None:
    for n in range(3):
        await devices.create(
            SYSTEM_CALLER,
            NewDevice(id=f"dev-{n}", attributes={"model": "x1", "imsi": f"00101000000000{n}"}),
        )
    found = await all_devices(devices, DeviceQuery(attributes={"model": "x1"}))
    assert [d.id for d in found] == ["dev-0", "dev-1", "dev-2"]


async def test_a_device_keeps_its_own_identity_on_update(devices: DeviceService) -> None:
    await devices.create(SYSTEM_CALLER, NewDevice(id="dev-1", attributes={"serial": "S1"}))
    updated = await devices.update(
        SYSTEM_CALLER, "dev-1", DevicePatch(attributes={"serial": "S1", "model": "m"})
    )
    assert dict(updated.attributes) == {"model": "m", "serial": "S1"}


# -- listing ----------------------------------------------------------------------------------


async def test_list_filters(devices: DeviceService, groups: GroupService) -> None:
    await groups.create(SYSTEM_CALLER, "field", "", {})
    await devices.create(
        SYSTEM_CALLER,
        NewDevice(id="a", attributes={"model": "x", "site": "n"}, addresses=("10.0.0.1",)),
    )
    await devices.create(
        SYSTEM_CALLER,
        NewDevice(id="b", group="field", attributes={"model": "x"}, status=DeviceStatus.DISABLED),
    )
    await devices.create(SYSTEM_CALLER, NewDevice(id="c", group="field", attributes={"model": "y"}))

    async def ids(query: DeviceQuery) -> list[str]:
        return [d.id for d in await all_devices(devices, query)]

    assert await ids(DeviceQuery()) == ["a", "b", "c"]
    assert await ids(DeviceQuery(group="field")) == ["b", "c"]
    assert await ids(DeviceQuery(group="default")) == ["a"]
    assert await ids(DeviceQuery(group="nowhere")) == []
    assert await ids(DeviceQuery(status=DeviceStatus.DISABLED)) == ["b"]
    assert await ids(DeviceQuery(status=DeviceStatus.ENABLED)) == ["a", "c"]
    assert await ids(DeviceQuery(attributes={"model": "x"})) == ["a", "b"]
    assert await ids(DeviceQuery(attributes={"model": "x", "site": "n"})) == ["a"]
    assert await ids(DeviceQuery(attributes={"model": "z"})) == []
    assert await ids(DeviceQuery(address="::ffff:10.0.0.1")) == ["a"]
    assert await ids(DeviceQuery(address="10.0.0.2")) == []
    assert await ids(DeviceQuery(group="field", status=DeviceStatus.ENABLED)) == ["c"]
    assert await ids(DeviceQuery(group="field", attributes={"model": "x"})) == ["b"]

    # Listed devices are complete, not just ids.
    (a,) = await all_devices(devices, DeviceQuery(address="10.0.0.1"))
    assert a == await devices.get(SYSTEM_CALLER, "a")


async def test_cursor_pagination_sees_every_device_once_in_id_order(
    devices: DeviceService,
) -> None:
    expected = [f"dev-{n:02d}" for n in range(25)]
    for device_id in reversed(expected):  # insertion order must not matter
        await devices.create(SYSTEM_CALLER, NewDevice(id=device_id, attributes={"n": device_id}))

    seen: list[str] = []
    page_sizes: list[int] = []
    cursor: str | None = None
    while True:
        page = await devices.list(SYSTEM_CALLER, DeviceQuery(), limit=10, cursor=cursor)
        page_sizes.append(len(page.items))
        seen.extend(d.id for d in page.items)
        assert all(dict(d.attributes) == {"n": d.id} for d in page.items)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
        assert len(page_sizes) < 10, "pagination does not end"

    assert page_sizes == [10, 10, 5]
    assert seen == expected


async def test_pagination_with_an_exact_multiple_ends_without_an_empty_page(
    devices: DeviceService,
) -> None:
    for n in range(20):
        await devices.create(SYSTEM_CALLER, NewDevice(id=f"dev-{n:02d}"))
    first = await devices.list(SYSTEM_CALLER, DeviceQuery(), limit=10, cursor=None)
    assert first.next_cursor is not None
    second = await devices.list(SYSTEM_CALLER, DeviceQuery(), limit=10, cursor=first.next_cursor)
    assert [d.id for d in second.items] == [f"dev-{n:02d}" for n in range(10, 20)]
    assert second.next_cursor is None


async def test_pagination_with_a_filter(devices: DeviceService) -> None:
    for n in range(12):
        status = DeviceStatus.ENABLED if n % 2 else DeviceStatus.DISABLED
        await devices.create(SYSTEM_CALLER, NewDevice(id=f"dev-{n:02d}", status=status))
    seen: list[str] = []
    cursor: str | None = None
    for _ in range(10):
        page = await devices.list(
            SYSTEM_CALLER, DeviceQuery(status=DeviceStatus.ENABLED), limit=4, cursor=cursor
        )
        seen.extend(d.id for d in page.items)
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == [f"dev-{n:02d}" for n in range(1, 12, 2)]


async def test_bad_limit_and_cursor_are_invalid(devices: DeviceService) -> None:
    with pytest.raises(InvalidRequest):
        await devices.list(SYSTEM_CALLER, DeviceQuery(), limit=0, cursor=None)
    with pytest.raises(InvalidRequest):
        await devices.list(SYSTEM_CALLER, DeviceQuery(), limit=501, cursor=None)
    with pytest.raises(InvalidRequest):
        await devices.list(SYSTEM_CALLER, DeviceQuery(), limit=10, cursor="%%%")


async def test_counts_by_status(devices: DeviceService) -> None:
    await devices.create(SYSTEM_CALLER, NewDevice(id="a"))
    await devices.create(SYSTEM_CALLER, NewDevice(id="b"))
    await devices.create(SYSTEM_CALLER, NewDevice(id="c", status=DeviceStatus.DISABLED))
    assert await devices.counts() == {"enabled": 2, "disabled": 1}
