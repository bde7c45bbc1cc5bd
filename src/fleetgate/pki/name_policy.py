"""Which names a device certificate may carry. Pure: the device and the policy in, names out.

A device certificate's common name is the device id. Besides it, only the DNS names and URIs
that the configured templates (``pki.device_dns_templates``, ``pki.device_uri_templates``)
produce for this device; a CSR asking for anything else is refused with the allowed list.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
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


_DNS_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:[\x21-\x7e]+$")


def _valid_uri(name: str) -> bool:
    return _URI.fullmatch(name) is not None


def _valid_dns(name: str) -> bool:
    return len(name) <= 253 and all(_DNS_LABEL.fullmatch(label) for label in name.split("."))


def allowed_names(
    device: Device, dns_templates: Sequence[str], uri_templates: Sequence[str]
) -> DeviceNames:
    def expand(
        templates: Sequence[str], key: str, valid: Callable[[str], bool], what: str
    ) -> tuple[str, ...]:
        names = []
        for text in templates:
            name = Template.parse(text, key).expand(device.id, device.group, device.attributes)
            if not valid(name):
                raise InvalidRequest(
                    f"{key} template {text!r} gives {name[:100]!r} for device {device.id}, "
                    f"which is not {what}; change the template or the device's attributes"
                )
            names.append(name)
        return tuple(names)

    return DeviceNames(
        dns_names=expand(dns_templates, "pki.device_dns_templates", _valid_dns, "a DNS name"),
        uris=expand(uri_templates, "pki.device_uri_templates", _valid_uri, "an ASCII absolute URI"),
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
