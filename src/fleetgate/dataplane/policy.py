"""Whether a resolved connection may proceed. Pure: no I/O, no await."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from fleetgate.records import Device, DeviceStatus


class Refusal(enum.StrEnum):
    UNKNOWN_DEVICE = "unknown_device"
    DEVICE_DISABLED = "device_disabled"
    LISTENER_FULL = "listener_full"


@dataclass(frozen=True)
class Decision:
    allowed: bool
    refusal: Refusal | None = None
    device: Device | None = None


def decide(device: Device | None, *, active: int, max_connections: int) -> Decision:
    if active >= max_connections:
        return Decision(False, Refusal.LISTENER_FULL, device)
    if device is None:
        return Decision(False, Refusal.UNKNOWN_DEVICE)
    if device.status is not DeviceStatus.ENABLED:
        return Decision(False, Refusal.DEVICE_DISABLED, device)
    return Decision(True, None, device)
