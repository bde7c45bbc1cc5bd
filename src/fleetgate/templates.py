"""``#{name}`` placeholders over a device's id and attributes: ``aws-#{imsi}``, ``#{device_id}``.

A template is checked when it is saved (syntax, known placeholders); expansion fails with a
clear error when the device lacks an attribute the template needs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from fleetgate.errors import InvalidRequest

_PLACEHOLDER = re.compile(r"#\{([a-z][a-z0-9_]{0,62})\}")
_LEFTOVER = re.compile(r"#\{")
MAX_TEMPLATE_CHARS = 256
BUILTIN = ("device_id", "group")


@dataclass(frozen=True)
class Template:
    text: str

    @classmethod
    def parse(cls, text: str, field: str = "template") -> Template:
        if not text or len(text) > MAX_TEMPLATE_CHARS:
            raise InvalidRequest(f"a template is 1-{MAX_TEMPLATE_CHARS} characters", field=field)
        if _LEFTOVER.search(_PLACEHOLDER.sub("", text)):
            raise InvalidRequest(
                f"{text[:80]!r}: a placeholder is #{{name}} with a lowercase attribute name",
                field=field,
            )
        return cls(text)

    @property
    def placeholders(self) -> tuple[str, ...]:
        return tuple(_PLACEHOLDER.findall(self.text))

    def expand(self, device_id: str, group: str, attributes: Mapping[str, str]) -> str:
        values = {**attributes, "device_id": device_id, "group": group}
        missing = [p for p in self.placeholders if p not in values]
        if missing:
            raise InvalidRequest(
                f"device {device_id} has no attribute {', '.join(missing)} for template "
                f"{self.text!r}"
            )
        return _PLACEHOLDER.sub(lambda m: values[m.group(1)], self.text)
