"""PostgreSQL databases whose default collation is not byte order.

The session server is initialised with ``--locale=C`` so the contract suite is deterministic, but
a production cluster usually takes the host's locale (``en_US.UTF-8`` on a typical Debian
install), where punctuation is ignored at the first comparison level. An ICU collation with
``ka-shifted`` compares the same way and needs no extra OS locale, so it stands in for one here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from fleetgate.clock import FakeClock
from fleetgate.services.context import SYSTEM_CALLER
from fleetgate.services.devices import DevicePatch, DeviceQuery, DeviceService, NewDevice
from fleetgate.services.groups import GroupService
from fleetgate.store import Database
from fleetgate.store.migrations import migrate
from fleetgate.store.postgres import PostgresDatabase
from support.postgres import PostgresServer

from .helpers import count

pytestmark = pytest.mark.postgres

NATURAL_LANGUAGE = (
    "TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US-u-ka-shifted' LOCALE 'C'"
)


@pytest.fixture
async def natural_db(pg_server: PostgresServer, clock: FakeClock) -> AsyncIterator[Database]:
    dsn = await pg_server.create_database(NATURAL_LANGUAGE)
    db = await PostgresDatabase.open(dsn, pool_max=2, timeout_s=10)
    try:
        await migrate(db, clock)
        await GroupService(db, clock).ensure_default()
        yield db
    finally:
        await db.close()
        await pg_server.drop_database(dsn)


async def test_the_collation_really_differs_from_byte_order(natural_db: Database) -> None:
    async with natural_db.snapshot() as tx:
        row = await tx.fetchrow("SELECT '12.0.0.1' < '1.2.3.4' AS shifted")
    assert row is not None
    assert row["shifted"] is True  # while '1.2.3.4' < '12.0.0.1' in byte order


async def test_addresses_read_back_in_the_order_they_were_written(
    natural_db: Database, clock: FakeClock
) -> None:
    """BUG (src/fleetgate/store/devices.py, DeviceRepo._hydrate, ``ORDER BY address``).

    The service sorts addresses in Python (code point order) but the repository reads them
    back ordered by the database's collation, so on such a database ``get`` disagrees with
    ``create``, and re-sending the same addresses is taken for a change: the revision moves
    and a spurious ``device.update`` entry is audited.
    """
    devices = DeviceService(natural_db, clock)
    created = await devices.create(
        SYSTEM_CALLER, NewDevice(id="dev-1", addresses=("12.0.0.1", "1.2.3.4"))
    )
    assert created.addresses == ("1.2.3.4", "12.0.0.1")
    assert (await devices.get(SYSTEM_CALLER, "dev-1")).addresses == created.addresses

    same = await devices.update(
        SYSTEM_CALLER, "dev-1", DevicePatch(addresses=("1.2.3.4", "12.0.0.1"))
    )
    assert same.revision == 1
    assert await count(natural_db, "audit_log") == 1


async def test_pagination_stays_consistent_under_the_collation(
    natural_db: Database, clock: FakeClock
) -> None:
    devices = DeviceService(natural_db, clock)
    ids = ["Dev-b", "dev-1", "dev-a", "dev-d", "dev.e", "dev_c", "DEV-F", "dev-10", "dev-9"]
    for device_id in ids:
        await devices.create(SYSTEM_CALLER, NewDevice(id=device_id))
    seen: list[str] = []
    cursor: str | None = None
    for _ in range(10):
        page = await devices.list(SYSTEM_CALLER, DeviceQuery(), limit=2, cursor=cursor)
        seen.extend(d.id for d in page.items)
        cursor = page.next_cursor
        if cursor is None:
            break
    assert sorted(seen) == sorted(ids)
    assert len(seen) == len(ids)
