"""A value that must never reach a log line, a repr or a traceback."""

from __future__ import annotations

import hmac
from typing import Final

_REDACTED: Final = "Secret('**********')"


class Secret:
    """Wraps secret bytes; ``repr``/``str`` are redacted, equality is constant-time."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes | str) -> None:
        self._value = value.encode() if isinstance(value, str) else bytes(value)

    def reveal(self) -> bytes:
        return self._value

    def reveal_text(self) -> str:
        return self._value.decode()

    def __repr__(self) -> str:
        return _REDACTED

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and hmac.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash(("Secret", len(self._value)))

    def __len__(self) -> int:
        return len(self._value)

    def __reduce__(self) -> str:
        raise TypeError("a Secret cannot be pickled")
