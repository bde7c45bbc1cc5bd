"""Remote access sessions in the store, on both backends, with an injected clock: who may open
what, the public port pool, expiry, events and their retention."""

from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from fleetgate.clock import FakeClock
from fleetgate.config.schema import SessionsConfig
from fleetgate.errors import Conflict, Forbidden, InvalidRequest, NotFound
from fleetgate.records import Role
from fleetgate.remote.records import EventKind
from fleetgate.services.bundle import Services
from fleetgate.services.context import SYSTEM_CALLER
from fleetgate.services.devices import DevicePatch, DeviceService, NewDevice
from fleetgate.services.groups import GroupService
from fleetgate.services.sessions import PORT_QUARANTINE_S, SessionRequest, SessionService
from fleetgate.store import Database

from .helpers import audit_entries, caller
from .pki_fixtures import build_services

ADMIN = caller(Role.ADMIN)
LAB_OPERATOR = caller(Role.OPERATOR, "lab")
VIEWER = caller(Role.VIEWER)


@pytest.fixture
async def services(db: Database, clock: FakeClock) -> Services:
    return await build_services(db, clock)


@pytest.fixture
async def sessions(
    db: Database,
    clock: FakeClock,
    groups: GroupService,
    devices: DeviceService,
    services: Services,
) -> SessionService:
    await groups.create(SYSTEM_CALLER, "lab", "", {"session_ports": [22, 8080]})
    await groups.create(SYSTEM_CALLER, "plant", "", {})
    await devices.create(SYSTEM_CALLER, NewDevice(id="kiosk", group="lab", addresses=("10.0.0.5",)))
    await devices.create(
        SYSTEM_CALLER, NewDevice(id="press", group="plant", addresses=("10.1.0.9",))
    )
    await devices.create(SYSTEM_CALLER, NewDevice(id="mute", group="lab"))
    config = SessionsConfig(ports="30000-30001", default_duration_s=600, max_duration_s=3600)
    return SessionService(db, clock, config, services.authority, services.vault)


async def test_open_maps_a_pool_port_to_the_devices_registered_address(
    sessions: SessionService, clock: FakeClock
) -> None:
    opened = await sessions.open(ADMIN, SessionRequest("kiosk", 22))
    assert (opened.device_address, opened.device_port) == ("10.0.0.5", 22)
    assert opened.public_port == 30000
    assert opened.cidrs == ("203.0.113.7/32",)  # the caller's own address by default
    assert opened.expires_at == clock.now() + timedelta(seconds=600)
    second = await sessions.open(ADMIN, SessionRequest("kiosk", 8080, cidrs=("198.51.100.0/24",)))
    assert second.public_port == 30001
    with pytest.raises(Conflict, match="every public port"):
        await sessions.open(ADMIN, SessionRequest("kiosk", 22))
    await sessions.delete(ADMIN, opened.id)
    third = await sessions.open(ADMIN, SessionRequest("kiosk", 22))
    assert third.public_port == 30000  # a closed session's port is free again


async def test_only_the_groups_ports_and_registered_devices_can_be_reached(
    sessions: SessionService,
) -> None:
    with pytest.raises(InvalidRequest, match="port 3389 is not open to sessions in group lab"):
        await sessions.open(ADMIN, SessionRequest("kiosk", 3389))
    with pytest.raises(Conflict, match="no registered address"):
        await sessions.open(ADMIN, SessionRequest("mute", 22))
    with pytest.raises(NotFound):
        await sessions.open(ADMIN, SessionRequest("ghost", 22))
    # A group without session_ports falls back to sessions.allowed_ports.
    assert (await sessions.open(ADMIN, SessionRequest("press", 22))).device_port == 22
    with pytest.raises(InvalidRequest, match="a session lasts 5 to 3600 seconds"):
        await sessions.open(ADMIN, SessionRequest("kiosk", 22, duration_s=3601))


async def test_a_token_limited_to_a_group_opens_and_sees_only_its_groups_sessions(
    sessions: SessionService,
) -> None:
    mine = await sessions.open(LAB_OPERATOR, SessionRequest("kiosk", 22))
    with pytest.raises(NotFound):  # outside its groups a device is as absent as none
        await sessions.open(LAB_OPERATOR, SessionRequest("press", 22))
    theirs = await sessions.open(ADMIN, SessionRequest("press", 22))
    listed = await sessions.search(LAB_OPERATOR)
    assert [s.id for s in listed.items] == [mine.id]
    with pytest.raises(NotFound):
        await sessions.get(LAB_OPERATOR, theirs.id)
    with pytest.raises(Forbidden):
        await sessions.open(VIEWER, SessionRequest("kiosk", 22))


async def test_expiry_ends_sessions_at_their_time_and_records_it(
    sessions: SessionService, clock: FakeClock, db: Database
) -> None:
    short = await sessions.open(ADMIN, SessionRequest("kiosk", 22, duration_s=60))
    longer = await sessions.open(ADMIN, SessionRequest("kiosk", 8080, duration_s=120))
    clock.advance(59)
    assert await sessions.expire_due() == []
    clock.advance(1)
    assert await sessions.expire_due() == [short.id]
    assert await sessions.expire_due() == []  # once
    ended = await sessions.get(ADMIN, short.id)
    assert (ended.open, ended.end_reason) == (False, "expired")
    assert (await sessions.get(ADMIN, longer.id)).open
    events = await sessions.events(ADMIN, short.id)
    assert [e.kind for e in events.items] == [EventKind.CREATED, EventKind.EXPIRED]
    audited = [e.action for e in await audit_entries(db) if e.target_id == short.id]
    assert audited == ["session.expire", "session.create"]  # newest first
    assert [s.id for s in await sessions.open_sessions()] == [longer.id]


async def test_events_page_and_are_pruned_after_the_retention(
    sessions: SessionService, clock: FakeClock
) -> None:
    opened = await sessions.open(ADMIN, SessionRequest("kiosk", 22))
    for n in range(5):
        await sessions.record(opened.id, EventKind.ACCESS, source=f"203.0.113.{n}:1000")
    first = await sessions.events(ADMIN, opened.id, limit=4)
    assert len(first.items) == 4
    assert first.next_cursor is not None
    rest = await sessions.events(ADMIN, opened.id, limit=4, cursor=first.next_cursor)
    assert [e.source for e in rest.items] == ["203.0.113.3:1000", "203.0.113.4:1000"]
    clock.advance(sessions.config.event_retention_days * 86400 + 1)
    assert await sessions.prune_events() == 6
    assert (await sessions.events(ADMIN, opened.id)).items == []


async def test_an_mtls_session_mints_a_client_certificate_that_ends_with_it(
    sessions: SessionService, clock: FakeClock, db: Database
) -> None:
    with pytest.raises(InvalidRequest, match="ask for tls too"):
        await sessions.open(ADMIN, SessionRequest("kiosk", 22, mtls=True))
    opened = await sessions.open(
        ADMIN, SessionRequest("kiosk", 22, duration_s=600, tls=True, mtls=True)
    )
    assert opened.client_serial is not None
    credential = await sessions.client_credential(ADMIN, opened.id)
    leaf = x509.load_pem_x509_certificate(credential.chain_pem.encode())
    assert format(leaf.serial_number, "x") == opened.client_serial
    assert leaf.not_valid_after_utc <= opened.expires_at  # it cannot outlive the session
    assert (
        ExtendedKeyUsageOID.CLIENT_AUTH
        in leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    )
    assert "PRIVATE KEY" in credential.key_pem
    plain = await sessions.open(ADMIN, SessionRequest("kiosk", 8080))
    with pytest.raises(Conflict, match="not mtls"):
        await sessions.client_credential(ADMIN, plain.id)
    await sessions.delete(ADMIN, opened.id)
    with pytest.raises(Conflict, match="has ended"):
        await sessions.client_credential(ADMIN, opened.id)
    audited = [e.action for e in await audit_entries(db) if e.target_id == opened.id]
    assert "session.client_credential" in audited


async def test_a_port_another_program_holds_is_passed_over_for_a_while(
    sessions: SessionService, clock: FakeClock
) -> None:
    sessions.quarantine_port(30000)
    opened = await sessions.open(ADMIN, SessionRequest("kiosk", 22))
    assert opened.public_port == 30001
    with pytest.raises(Conflict, match="1 held by other programs"):
        await sessions.open(ADMIN, SessionRequest("kiosk", 8080))
    clock.advance(PORT_QUARANTINE_S)
    again = await sessions.open(ADMIN, SessionRequest("kiosk", 8080))
    assert again.public_port == 30000


async def test_a_device_change_ends_the_sessions_it_no_longer_allows(
    sessions: SessionService, devices: DeviceService, db: Database
) -> None:
    renamed = await sessions.open(ADMIN, SessionRequest("kiosk", 22))
    await devices.update(SYSTEM_CALLER, "kiosk", DevicePatch(name="Kiosk 5"))
    assert await sessions.end_for_device("kiosk") == []  # a new name changes nothing
    await devices.update(SYSTEM_CALLER, "kiosk", DevicePatch(addresses=("10.0.0.5", "10.0.0.6")))
    assert await sessions.end_for_device("kiosk") == []  # the dialled address is still its own
    await devices.update(SYSTEM_CALLER, "kiosk", DevicePatch(addresses=("10.0.0.6",)))
    assert await sessions.end_for_device("kiosk") == [renamed.id]
    ended = await sessions.get(ADMIN, renamed.id)
    assert (ended.open, ended.end_reason) == (False, "device_address_removed")
    events = (await sessions.events(ADMIN, renamed.id)).items
    assert [(e.kind, e.detail) for e in events[-1:]] == [
        (EventKind.ENDED, {"reason": "device_address_removed"})
    ]
    assert "session.end" in [e.action for e in await audit_entries(db)]

    moved = await sessions.open(ADMIN, SessionRequest("kiosk", 22))
    await devices.update(SYSTEM_CALLER, "kiosk", DevicePatch(group="plant"))
    assert await sessions.end_for_device("kiosk") == [moved.id]
    assert (await sessions.get(ADMIN, moved.id)).end_reason == "device_group_changed"
    assert await sessions.end_for_device("kiosk") == []  # ended once only
