"""A device is not forgotten while certificates or credentials still speak for it."""

from __future__ import annotations

from datetime import timedelta

import pytest

from fleetgate.clock import FakeClock
from fleetgate.errors import Conflict, NotFound
from fleetgate.pki.crl import RevocationReason
from fleetgate.pki.keys import KeyAlgorithm
from fleetgate.services.context import SYSTEM_CALLER
from fleetgate.services.devices import NewDevice
from fleetgate.store import Database

from .pki_fixtures import build_services


async def test_delete_waits_for_certificates_and_credentials(
    db: Database, clock: FakeClock
) -> None:
    services = await build_services(db, clock)
    await services.devices.create(SYSTEM_CALLER, NewDevice(id="meter"))
    issued = await services.issuing.issue_for_device(
        SYSTEM_CALLER,
        "meter",
        csr=None,
        generate=KeyAlgorithm.EC_P256,
        lifetime=timedelta(days=30),
    )
    with pytest.raises(Conflict, match="valid certificates"):
        await services.devices.delete(SYSTEM_CALLER, "meter")
    await services.revocation.revoke(
        SYSTEM_CALLER, issued.certificate.serial, RevocationReason.CESSATION_OF_OPERATION
    )
    with pytest.raises(Conflict, match="credentials"):
        await services.devices.delete(SYSTEM_CALLER, "meter")
    assert issued.credential_id is not None
    await services.credentials.delete(SYSTEM_CALLER, issued.credential_id)
    await services.devices.delete(SYSTEM_CALLER, "meter")
    with pytest.raises(NotFound):
        await services.devices.get(SYSTEM_CALLER, "meter")


async def test_an_expired_certificate_does_not_hold_the_device(
    db: Database, clock: FakeClock
) -> None:
    services = await build_services(db, clock)
    await services.devices.create(SYSTEM_CALLER, NewDevice(id="old"))
    csr_device_key = await services.issuing.issue_for_device(
        SYSTEM_CALLER,
        "old",
        csr=None,
        generate=KeyAlgorithm.EC_P256,
        lifetime=timedelta(days=1),
    )
    assert csr_device_key.credential_id is not None
    await services.credentials.delete(SYSTEM_CALLER, csr_device_key.credential_id)
    clock.advance(2 * 86_400)
    await services.devices.delete(SYSTEM_CALLER, "old")
