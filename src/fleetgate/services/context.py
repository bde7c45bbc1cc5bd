"""Who asked, and from where: carried into authorization and every audit entry."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from fleetgate.auth.authz import SYSTEM, Principal
from fleetgate.errors import InvalidRequest

MAX_PAGE = 500
DEFAULT_PAGE = 100


@dataclass(frozen=True)
class Caller:
    principal: Principal
    request_id: str | None = None
    source: str | None = None


SYSTEM_CALLER = Caller(principal=SYSTEM)


def encode_cursor(value: str) -> str:
    return base64.urlsafe_b64encode(value.encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> str | None:
    if cursor is None or cursor == "":
        return None
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        value = base64.b64decode(padded.encode(), altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        value = ""
    if not value:
        raise InvalidRequest("cursor is not one this API returned", field="cursor")
    return value


def check_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidRequest(f"limit must be between 1 and {MAX_PAGE}", field="limit")
    return limit
