"""Device routes and group settings.routes, identically on both backends."""

from __future__ import annotations

import json

import pytest

from fleetgate.clock import FakeClock, to_epoch_us
from fleetgate.errors import InvalidRequest
from fleetgate.records import MAX_ROUTES, DeviceStatus
from fleetgate.services.context import SYSTEM_CALLER
from fleetgate.services.devices import DevicePatch, DeviceQuery, DeviceService, NewDevice
from fleetgate.services.groups import GroupService
from fleetgate.store import Database
from fleetgate.store.devices import DeviceRepo
from fleetgate.store.migrations import MIGRATIONS, applied_versions, migrate

from .conftest import Store
from .helpers import audit_entries, count, rows
from .pki_fixtures import build_services

ROUTES_VERSION = 4


async def stored_routes(db: Database, device_id: str) -> dict[str, str]:
    """The routes column as the database holds it, parsed (no repository in between)."""
    async with db.snapshot() as tx:
        row = await tx.fetchrow("SELECT routes FROM devices WHERE id = ?", device_id)
    assert row is not None
    routes: dict[str, str] = json.loads(row["routes"])
    return routes


# -- create and read -----------------------------------------------------------------------------


async def test_routes_are_stored_and_read_back_everywhere(
    devices: DeviceService, db: Database
) -> None:
    created = await devices.create(
        SYSTEM_CALLER,
        NewDevice(
            id="dev-1", addresses=("10.0.0.1",), routes={"mqtt": "aws-iot", "http": "local-api"}
        ),
    )
    assert created.routes == {"http": "local-api", "mqtt": "aws-iot"}
    assert list(created.routes) == ["http", "mqtt"]
    assert await stored_routes(db, "dev-1") == {"http": "local-api", "mqtt": "aws-iot"}

    fetched = await devices.get(SYSTEM_CALLER, "dev-1")
    assert fetched == created
    assert list(fetched.routes) == ["http", "mqtt"]
    found = await devices.find_by_address("10.0.0.1")
    assert found is not None
    assert found.routes == created.routes
    listed = await devices.list(SYSTEM_CALLER, DeviceQuery(), limit=10, cursor=None)
    assert [d.routes for d in listed.items] == [created.routes]


async def test_a_device_without_routes_has_an_empty_map(
    devices: DeviceService, db: Database
) -> None:
    created = await devices.create(SYSTEM_CALLER, NewDevice(id="dev-1"))
    assert created.routes == {}
    assert (await devices.get(SYSTEM_CALLER, "dev-1")).routes == {}
    assert await stored_routes(db, "dev-1") == {}


async def test_routes_of_many_devices_do_not_mix(devices: DeviceService) -> None:
    for n in range(5):
        await devices.create(
            SYSTEM_CALLER, NewDevice(id=f"dev-{n}", routes={f"l{n}": f"d{n}"} if n % 2 else None)
        )
    page = await devices.list(SYSTEM_CALLER, DeviceQuery(), limit=2, cursor=None)
    rest = await devices.list(SYSTEM_CALLER, DeviceQuery(), limit=10, cursor=page.next_cursor)
    assert {d.id: d.routes for d in [*page.items, *rest.items]} == {
        "dev-0": {},
        "dev-1": {"l1": "d1"},
        "dev-2": {},
        "dev-3": {"l3": "d3"},
        "dev-4": {},
    }


@pytest.mark.parametrize(
    ("routes", "field"),
    [
        ({"MQTT": "aws"}, "routes.MQTT"),
        ({"mqtt": "aws iot"}, "routes.mqtt"),
        ({f"l{n}": "d" for n in range(MAX_ROUTES + 1)}, "routes"),
    ],
)
async def test_create_refuses_bad_routes_and_writes_nothing(
    devices: DeviceService, db: Database, routes: dict[str, str], field: str
) -> None:
    with pytest.raises(InvalidRequest) as info:
        await devices.create(SYSTEM_CALLER, NewDevice(id="dev-1", routes=routes))
    assert info.value.field == field
    assert await count(db, "devices") == 0
    assert await audit_entries(db, target_type="device") == []


# -- update ----------------------------------------------------------------------------------------


async def test_patch_merges_routes_and_none_removes_one(
    devices: DeviceService, db: Database
) -> None:
    await devices.create(SYSTEM_CALLER, NewDevice(id="dev-1", routes={"mqtt": "aws", "http": "a"}))

    changed = await devices.update(
        SYSTEM_CALLER, "dev-1", DevicePatch(routes={"mqtt": "local", "udp": "ingest", "http": None})
    )
    assert changed.routes == {"mqtt": "local", "udp": "ingest"}
    assert changed.revision == 2
    assert await stored_routes(db, "dev-1") == {"mqtt": "local", "udp": "ingest"}

    # Other fields leave routes alone; routes leave other fields alone.
    renamed = await devices.update(SYSTEM_CALLER, "dev-1", DevicePatch(name="Pump"))
    assert renamed.routes == changed.routes
    rerouted = await devices.update(
        SYSTEM_CALLER, "dev-1", DevicePatch(routes={"mqtt": None, "udp": None})
    )
    assert rerouted.routes == {}
    assert rerouted.name == "Pump"
    assert await stored_routes(db, "dev-1") == {}


async def test_a_patch_that_changes_no_route_changes_nothing(
    devices: DeviceService, db: Database
) -> None:
    created = await devices.create(SYSTEM_CALLER, NewDevice(id="dev-1", routes={"mqtt": "aws"}))
    same = await devices.update(
        SYSTEM_CALLER, "dev-1", DevicePatch(routes={"mqtt": "aws", "http": None})
    )
    assert same == created
    assert [e.action for e in await audit_entries(db, target_type="device")] == ["device.create"]


async def test_update_refuses_bad_routes_and_keeps_the_old_ones(
    devices: DeviceService, db: Database
) -> None:
    await devices.create(SYSTEM_CALLER, NewDevice(id="dev-1", routes={"mqtt": "aws"}))
    with pytest.raises(InvalidRequest) as info:
        await devices.update(SYSTEM_CALLER, "dev-1", DevicePatch(routes={"http": "Bad"}))
    assert info.value.field == "routes.http"
    too_many = {f"l{n}": "d" for n in range(MAX_ROUTES)}  # 32 new ones on top of mqtt
    with pytest.raises(InvalidRequest, match=f"at most {MAX_ROUTES} routes"):
        await devices.update(SYSTEM_CALLER, "dev-1", DevicePatch(routes=too_many))
    current = await devices.get(SYSTEM_CALLER, "dev-1")
    assert current.routes == {"mqtt": "aws"}
    assert current.revision == 1


async def test_the_audit_log_shows_routes_before_and_after(
    devices: DeviceService, db: Database
) -> None:
    await devices.create(SYSTEM_CALLER, NewDevice(id="dev-1", routes={"mqtt": "aws"}))
    await devices.update(SYSTEM_CALLER, "dev-1", DevicePatch(routes={"mqtt": "local"}))
    await devices.update(SYSTEM_CALLER, "dev-1", DevicePatch(status=DeviceStatus.DISABLED))
    created, routed, disabled = reversed(await audit_entries(db, target_type="device"))
    assert created.after is not None
    assert created.after["routes"] == {"mqtt": "aws"}
    assert routed.before == created.after
    assert routed.after == {**created.after, "routes": {"mqtt": "local"}, "revision": 2}
    assert disabled.before is not None
    assert disabled.after is not None
    assert disabled.before["routes"] == disabled.after["routes"] == {"mqtt": "local"}


# -- replacement -----------------------------------------------------------------------------------


async def test_replacement_moves_routes_to_the_new_device(db: Database, clock: FakeClock) -> None:
    services = await build_services(db, clock)
    await services.devices.create(
        SYSTEM_CALLER, NewDevice(id="old-1", routes={"mqtt": "aws", "http": "api"})
    )
    done = await services.replacement.replace(SYSTEM_CALLER, "old-1", "new-1")
    assert done.new.routes == {"http": "api", "mqtt": "aws"}
    assert done.old.routes == {}
    assert (await services.devices.get(SYSTEM_CALLER, "new-1")).routes == done.new.routes
    assert await stored_routes(db, "old-1") == {}
    (entry,) = await audit_entries(db, action="device.replace")
    assert entry.after is not None
    assert entry.after["new"]["routes"] == {"http": "api", "mqtt": "aws"}
    assert entry.after["old"]["routes"] == {}


async def test_replacement_onto_an_existing_device_merges_its_routes(
    db: Database, clock: FakeClock
) -> None:
    services = await build_services(db, clock)
    await services.devices.create(SYSTEM_CALLER, NewDevice(id="old-1", routes={"mqtt": "aws"}))
    await services.devices.create(
        SYSTEM_CALLER, NewDevice(id="spare", routes={"mqtt": "lab", "udp": "ingest"})
    )
    done = await services.replacement.replace(SYSTEM_CALLER, "old-1", "spare")
    # Like attributes, the old device's routes win where both have one.
    assert done.new.routes == {"mqtt": "aws", "udp": "ingest"}
    assert await stored_routes(db, "spare") == {"mqtt": "aws", "udp": "ingest"}


# -- group settings.routes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"routes": "aws"}, "settings.routes"),
        ({"routes": None}, "settings.routes"),
        ({"routes": ["mqtt"]}, "settings.routes"),
        ({"routes": {"mqtt": 1}}, "settings.routes.mqtt"),
        ({"routes": {"mqtt": "AWS"}}, "settings.routes.mqtt"),
        ({"routes": {"Bad": "aws"}}, "settings.routes.Bad"),
        ({"routes": {f"l{n}": "d" for n in range(MAX_ROUTES + 1)}}, "settings.routes"),
    ],
)
async def test_group_settings_routes_must_be_valid_routes(
    groups: GroupService, db: Database, settings: dict[str, object], field: str
) -> None:
    with pytest.raises(InvalidRequest) as created:
        await groups.create(SYSTEM_CALLER, "plant", "", settings)
    assert created.value.field == field
    assert [r["name"] for r in await rows(db, "groups", "name")] == ["default"]

    await groups.create(SYSTEM_CALLER, "plant", "", {})
    with pytest.raises(InvalidRequest) as updated:
        await groups.update(SYSTEM_CALLER, "plant", description=None, settings=settings)
    assert updated.value.field == field
    assert (await groups.get(SYSTEM_CALLER, "plant")).settings == {}


async def test_group_settings_keep_routes_and_stay_free_form_otherwise(
    groups: GroupService,
) -> None:
    settings = {"routes": {"mqtt": "aws-iot"}, "mtu": 1400, "Odd Key": [1, {"x": None}]}
    created = await groups.create(SYSTEM_CALLER, "plant", "", settings)
    assert created.settings == settings
    assert (await groups.get(SYSTEM_CALLER, "plant")).settings == settings
    updated = await groups.update(
        SYSTEM_CALLER, "plant", description=None, settings={"routes": {}, "anything": "goes"}
    )
    assert updated.settings == {"routes": {}, "anything": "goes"}


# -- migration -------------------------------------------------------------------------------------


async def test_a_store_from_before_routes_opens_with_empty_routes(
    store: Store, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database made by the fleetgate before version 4 keeps its devices, each with {}."""
    assert MIGRATIONS[ROUTES_VERSION - 1].version == ROUTES_VERSION
    assert MIGRATIONS[ROUTES_VERSION - 1].name == "device routes"
    db = await store.open()
    earlier = tuple(m for m in MIGRATIONS if m.version < ROUTES_VERSION)
    with monkeypatch.context() as patched:
        patched.setattr("fleetgate.store.migrations.MIGRATIONS", earlier)
        assert await migrate(db, clock) == [m.version for m in earlier]
    now = to_epoch_us(clock.now())
    async with db.transaction() as tx:  # the version-3 columns only, as the old code wrote them
        await tx.execute(
            "INSERT INTO groups (name, description, settings, created_at, updated_at, revision) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            "default",
            "",
            '{"routes": {"mqtt": "aws"}}',
            now,
            now,
            1,
        )
        for device_id in ("old-1", "old-2"):
            await tx.execute(
                "INSERT INTO devices (id, name, group_name, status, created_at, updated_at, "
                "revision) VALUES (?, ?, ?, ?, ?, ?, ?)",
                device_id,
                device_id,
                "default",
                "enabled",
                now,
                now,
                3,
            )
        await tx.execute(
            "INSERT INTO device_attributes (device_id, key, value) VALUES (?, ?, ?)",
            "old-1",
            "model",
            "m1",
        )

    later = [m.version for m in MIGRATIONS if m.version >= ROUTES_VERSION]
    assert await migrate(db, clock) == later
    assert await applied_versions(db) == [m.version for m in MIGRATIONS]
    assert await stored_routes(db, "old-1") == {}
    assert await stored_routes(db, "old-2") == {}
    async with db.snapshot() as tx:
        old = await DeviceRepo(tx).get("old-1")
    assert old is not None
    assert old.routes == {}
    assert old.attributes == {"model": "m1"}
    assert old.revision == 3

    devices = DeviceService(db, clock)
    updated = await devices.update(SYSTEM_CALLER, "old-2", DevicePatch(routes={"http": "api"}))
    assert updated.routes == {"http": "api"}
    assert await stored_routes(db, "old-2") == {"http": "api"}
    assert (await devices.get(SYSTEM_CALLER, "old-1")).routes == {}
