"""Which names a device certificate may carry. Pure: the device and the policy in, names out.

A device certificate's common name is the device id. Besides it, only the DNS names and URIs
that the configured templates (``pki.device_dns_templates``, ``pki.device_uri_templates``)
produce for this device; a CSR asking for anything else is refused with the allowed list.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fleetgate.errors import InvalidRequest
from fleetgate.pki.authority import Subject
from fleetgate.pki.csr import RequestedNames
from fleetgate.records import Device
from fleetgate.templates import Template


@dataclass(frozen=True)
class DeviceNames:
    dns_names: tuple[str, ...]
    uris: tuple[str, ...]

    def describe(self) -> str:
        allowed = [f"DNS:{d}" for d in self.dns_names] + [f"URI:{u}" for u in self.uris]
        return ", ".join(allowed) or "no subjectAltName (the common name is the device id)"


def allowed_names(
    device: Device, dns_templates: Sequence[str], uri_templates: Sequence[str]
) -> DeviceNames:
    def expand(templates: Sequence[str], key: str) -> tuple[str, ...]:
        return tuple(
            Template.parse(t, key).expand(device.id, device.group, device.attributes)
            for t in templates
        )

    return DeviceNames(
        dns_names=expand(dns_templates, "pki.device_dns_templates"),
        uris=expand(uri_templates, "pki.device_uri_templates"),
    )


def subject_for(device: Device, allowed: DeviceNames, requested: RequestedNames | None) -> Subject:
    """The subject to certify: all allowed names, or the requested ones if all are allowed."""
    if requested is None:
        return Subject(device.id, dns_names=allowed.dns_names, uris=allowed.uris)
    if requested.common_name not in (None, device.id):
        raise InvalidRequest(
            f"the CSR's common name {requested.common_name[:80]!r} is not the device id "
            f"{device.id!r}",
            field="csr",
        )
    outside = [f"DNS:{d}" for d in requested.dns_names if d not in allowed.dns_names]
    outside += [f"URI:{u}" for u in requested.uris if u not in allowed.uris]
    outside += [f"IP:{a}" for a in requested.ip_addresses]
    outside += [f"email:{e}" for e in requested.emails]
    if outside:
        raise InvalidRequest(
            f"the CSR asks for {', '.join(outside)[:300]}, outside device {device.id}'s name "
            f"policy; allowed: {allowed.describe()}",
            field="csr",
        )
    return Subject(device.id, dns_names=requested.dns_names, uris=requested.uris)
