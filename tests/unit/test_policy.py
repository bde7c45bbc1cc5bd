"""Admission decisions on the data plane."""

from __future__ import annotations

from datetime import UTC, datetime

from fleetgate.dataplane.policy import Decision, Refusal, decide
from fleetgate.records import Device, DeviceStatus

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def device(status: DeviceStatus = DeviceStatus.ENABLED) -> Device:
    return Device(
        id="plc-1",
        name="PLC 1",
        group="default",
        status=status,
        attributes={},
        addresses=("10.0.0.1",),
        created_at=NOW,
        updated_at=NOW,
        revision=1,
    )


def test_enabled_device_is_allowed() -> None:
    known = device()
    assert decide(known, active=0, max_connections=10) == Decision(True, None, known)
    assert decide(known, active=9, max_connections=10).allowed


def test_unknown_device_is_refused() -> None:
    assert decide(None, active=0, max_connections=10) == Decision(
        False, Refusal.UNKNOWN_DEVICE, None
    )


def test_disabled_device_is_refused() -> None:
    disabled = device(DeviceStatus.DISABLED)
    assert decide(disabled, active=0, max_connections=10) == Decision(
        False, Refusal.DEVICE_DISABLED, disabled
    )


def test_full_listener_refuses_everyone() -> None:
    known = device()
    assert decide(known, active=10, max_connections=10) == Decision(
        False, Refusal.LISTENER_FULL, known
    )
    assert decide(known, active=11, max_connections=10).refusal is Refusal.LISTENER_FULL
    assert decide(None, active=1, max_connections=1).refusal is Refusal.LISTENER_FULL


def test_refusal_values_are_stable_log_labels() -> None:
    assert [r.value for r in Refusal] == ["unknown_device", "device_disabled", "listener_full"]
