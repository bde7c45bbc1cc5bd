"""The error tree and the one table that translates it at every seam.

Each error kind has exactly one HTTP status, one CLI exit code and one problem type. The API
renders errors as RFC 9457 problem+json with ``type`` = ``urn:fleetgate:problem:<slug>``; the CLI
reads the slug back and exits with the code from this same table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

PROBLEM_TYPE_PREFIX = "urn:fleetgate:problem:"


@dataclass(frozen=True)
class ErrorKind:
    slug: str
    title: str
    http_status: int
    exit_code: int


class FleetgateError(Exception):
    """Root of every error fleetgate raises on purpose."""

    kind: ClassVar[ErrorKind] = ErrorKind("internal", "Internal error", 500, 1)

    def __init__(self, detail: str, *, field: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.field = field


class ConfigError(FleetgateError):
    """The configuration cannot be used; ``detail`` names the key path and the fix."""

    kind = ErrorKind("config-invalid", "Configuration is invalid", 500, 78)


class InvalidRequest(FleetgateError):
    kind = ErrorKind("invalid-request", "Request is invalid", 422, 65)


class MalformedBody(FleetgateError):
    kind = ErrorKind("malformed-body", "Request body is not valid JSON", 400, 65)


class Unauthenticated(FleetgateError):
    kind = ErrorKind("unauthenticated", "Authentication required", 401, 77)


class Forbidden(FleetgateError):
    kind = ErrorKind("forbidden", "Not allowed for this token", 403, 77)


class NotFound(FleetgateError):
    kind = ErrorKind("not-found", "Not found", 404, 66)


class Conflict(FleetgateError):
    kind = ErrorKind("conflict", "Conflicts with existing state", 409, 73)


class PreconditionFailed(FleetgateError):
    kind = ErrorKind("precondition-failed", "Resource changed since it was read", 412, 75)


class StoreUnavailable(FleetgateError):
    kind = ErrorKind("store-unavailable", "Store is unavailable", 503, 74)


class SealingError(FleetgateError):
    """A sealed secret cannot be opened: wrong or missing master key, or tampered data."""

    kind = ErrorKind("sealing-failed", "Sealed secret cannot be opened", 500, 70)


ERROR_TABLE: tuple[type[FleetgateError], ...] = (
    FleetgateError,
    ConfigError,
    InvalidRequest,
    MalformedBody,
    Unauthenticated,
    Forbidden,
    NotFound,
    Conflict,
    PreconditionFailed,
    StoreUnavailable,
    SealingError,
)

# Exit codes the CLI uses when no server answer is involved.
EXIT_OK = 0
EXIT_USAGE = 2
EXIT_UNREACHABLE = 69  # EX_UNAVAILABLE: the API could not be reached


def kind_for_slug(slug: str) -> ErrorKind:
    for cls in ERROR_TABLE:
        if cls.kind.slug == slug:
            return cls.kind
    return FleetgateError.kind
