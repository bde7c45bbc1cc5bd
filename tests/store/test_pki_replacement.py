"""Device replacement (ReplacementService.replace) on both backends."""

from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography import x509

from fleetgate.clock import FakeClock
from fleetgate.config.schema import PkiConfig
from fleetgate.errors import Forbidden, InvalidRequest, NotFound
from fleetgate.pki.crl import RevocationReason
from fleetgate.pki.records import CredentialKind
from fleetgate.records import DeviceStatus, Role
from fleetgate.sealing import Secret
from fleetgate.services.bundle import Services
from fleetgate.services.context import SYSTEM_CALLER
from fleetgate.services.credentials import CredentialInput
from fleetgate.store import Database

from .helpers import audit_entries, caller, count
from .pki_fixtures import (
    add_device,
    build_services,
    certificates_of,
    held_credential_id,
    issue_csr,
    issue_held,
    issuing_ca,
    key_public_der,
    public_der,
    x509_of,
)

OPERATOR = caller(Role.OPERATOR, "fleet-a")


@pytest.fixture
async def pki(db: Database, clock: FakeClock) -> Services:
    services = await build_services(
        db, clock, PkiConfig(device_dns_templates=("#{device_id}.fleet.example",))
    )
    for group in ("fleet-a", "fleet-b"):
        await services.groups.create(SYSTEM_CALLER, group, "", {})
    return services


async def old_device_with_credentials(pki: Services) -> tuple[str, str]:
    """Device ``old-1`` in fleet-a with attributes, addresses, a password and a held x509
    credential and a CSR-issued certificate; (held certificate serial, CSR serial)."""
    await add_device(
        pki,
        "old-1",
        group="fleet-a",
        attributes={"imsi": "001010000000001", "model": "m2"},
        addresses=("10.1.0.5", "10.1.0.6"),
    )
    await pki.credentials.create(
        OPERATOR,
        CredentialInput(
            id="mqtt-old-1",
            kind=CredentialKind.PASSWORD,
            device_id="old-1",
            public={"username": "old-1"},
            secret=Secret("hunter2-but-longer"),
        ),
    )
    _, held = await issue_held(pki, "old-1", timedelta(days=90), caller=OPERATOR)
    from_csr = await issue_csr(pki, "old-1", timedelta(days=90))
    return held.serial, from_csr.serial


async def test_the_new_device_takes_over_identity_credentials_and_a_fresh_certificate(
    pki: Services, db: Database, clock: FakeClock
) -> None:
    held_serial, csr_serial = await old_device_with_credentials(pki)
    ca = await issuing_ca(pki)
    crl_before = await pki.revocation.crl()
    held_before = await pki.credentials.get(SYSTEM_CALLER, held_credential_id("old-1"))
    assert held_before.certificate is not None
    clock.advance(3600)

    result = await pki.replacement.replace(
        OPERATOR, "old-1", "new-1", attributes={"imsi": "001010000000002"}
    )
    assert result.old.id == "old-1"
    assert result.new.id == "new-1"
    assert sorted(result.rebound) == sorted([held_credential_id("old-1"), "mqtt-old-1"])
    assert sorted(result.revoked) == sorted([held_serial, csr_serial])
    assert [c for c, _ in result.reissued] == [held_credential_id("old-1")]

    new = await pki.devices.get(SYSTEM_CALLER, "new-1")
    assert new.group == "fleet-a"
    assert dict(new.attributes) == {"imsi": "001010000000002", "model": "m2"}
    assert new.addresses == ("10.1.0.5", "10.1.0.6")
    assert new.status is DeviceStatus.ENABLED
    old = await pki.devices.get(SYSTEM_CALLER, "old-1")
    assert old.status is DeviceStatus.DISABLED
    assert dict(old.attributes) == {}
    assert old.addresses == ()
    assert old.group == "fleet-a"

    # Credentials follow the device, secrets intact.
    password = await pki.credentials.get(SYSTEM_CALLER, "mqtt-old-1")
    assert password.device_id == "new-1"
    assert await pki.credentials.secret(password) == Secret("hunter2-but-longer")
    held = await pki.credentials.get(SYSTEM_CALLER, held_credential_id("old-1"))
    assert held.device_id == "new-1"

    # The old certificates are revoked as superseded and listed on the CRL at once.
    for serial in (held_serial, csr_serial):
        record = await pki.revocation.certificate(SYSTEM_CALLER, serial)
        assert record.revoked_at == clock.now()
        assert record.revocation_reason is RevocationReason.SUPERSEDED
    crl_after = await pki.revocation.crl()
    assert crl_after.number > crl_before.number
    crl = x509.load_der_x509_crl(crl_after.der)
    for serial in (held_serial, csr_serial):
        entry = crl.get_revoked_certificate_by_serial_number(int(serial, 16))
        assert entry is not None
        reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
        assert reason is x509.ReasonFlags.superseded

    # The held credential now carries a new certificate, for the new device, with a new key.
    ((_, new_serial),) = result.reissued
    assert held.certificate_serial == new_serial
    assert held.certificate is not None
    issued = x509_of(held.certificate)
    assert issued.subject.rfc4514_string() == "CN=new-1"
    names = issued.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["new-1.fleet.example"]
    assert public_der(issued) != public_der(x509_of(held_before.certificate))
    issued.verify_directly_issued_by(ca.certificate)
    secret = await pki.credentials.secret(held)
    assert secret is not None
    assert key_public_der(secret.reveal()) == public_der(issued)
    record = await pki.revocation.certificate(SYSTEM_CALLER, new_serial)
    assert (record.device_id, record.credential_id, record.revoked) == (
        "new-1",
        held.id,
        False,
    )
    assert [c.serial for c in await certificates_of(db, "new-1")] == [new_serial]

    # Each step is in the audit log, in the old device's group, by the operator.
    wanted = {
        ("device.replace", "old-1"),
        ("credential.rebind", "mqtt-old-1"),
        ("credential.rebind", held.id),
        ("certificate.revoke", held_serial),
        ("certificate.revoke", csr_serial),
        ("certificate.issue", new_serial),
    }
    entries = [
        e for e in await audit_entries(db, since=clock.now()) if (e.action, e.target_id) in wanted
    ]
    assert {(e.action, e.target_id) for e in entries} == wanted
    assert len(entries) == len(wanted)
    assert {(e.actor, e.group) for e in entries} == {(OPERATOR.principal.actor, "fleet-a")}
    (replace_entry,) = [e for e in entries if e.action == "device.replace"]
    assert replace_entry.after is not None
    assert replace_entry.after["replaced_by"] == "new-1"


async def test_replacing_into_an_existing_device_merges(pki: Services, clock: FakeClock) -> None:
    await old_device_with_credentials(pki)
    await add_device(
        pki,
        "spare-7",
        group="fleet-a",
        attributes={"colour": "red", "model": "m1"},
        addresses=("10.1.0.99",),
    )
    result = await pki.replacement.replace(OPERATOR, "old-1", "spare-7", name="Spare seven")
    merged = await pki.devices.get(SYSTEM_CALLER, "spare-7")
    assert merged == result.new
    assert merged.name == "Spare seven"
    assert dict(merged.attributes) == {
        "colour": "red",
        "imsi": "001010000000001",
        "model": "m2",
    }
    assert merged.addresses == ("10.1.0.5", "10.1.0.6", "10.1.0.99")
    assert merged.revision == 2
    held = await pki.credentials.get(SYSTEM_CALLER, held_credential_id("old-1"))
    assert held.device_id == "spare-7"
    assert held.certificate is not None
    assert x509_of(held.certificate).subject.rfc4514_string() == "CN=spare-7"


async def test_refusals_change_nothing(pki: Services, db: Database) -> None:
    await old_device_with_credentials(pki)
    await add_device(pki, "other-b", group="fleet-b")
    before = {t: await count(db, t) for t in ("devices", "certificates", "credentials")}
    crl_before = await pki.revocation.crl()

    with pytest.raises(InvalidRequest):
        await pki.replacement.replace(SYSTEM_CALLER, "old-1", "old-1")
    with pytest.raises(Forbidden):
        await pki.replacement.replace(caller(Role.OPERATOR, "fleet-b"), "old-1", "new-1")
    with pytest.raises(Forbidden):
        await pki.replacement.replace(caller(Role.VIEWER, "fleet-a"), "old-1", "new-1")
    with pytest.raises(Forbidden):  # may not take over a device of a group it cannot write
        await pki.replacement.replace(OPERATOR, "old-1", "other-b")
    with pytest.raises(NotFound):
        await pki.replacement.replace(SYSTEM_CALLER, "nobody", "new-1")

    assert {t: await count(db, t) for t in before} == before
    assert (await pki.devices.get(SYSTEM_CALLER, "old-1")).status is DeviceStatus.ENABLED
    assert await pki.revocation.crl() == crl_before
    assert all(not c.revoked for c in await certificates_of(db, "old-1"))
    assert await audit_entries(db, action="device.replace") == []
