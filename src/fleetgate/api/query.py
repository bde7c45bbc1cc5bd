"""Query strings: unknown parameters are refused, as unknown body fields are."""

from __future__ import annotations

from collections.abc import Iterable

from fastapi import Request

from fleetgate.errors import InvalidRequest

ATTRIBUTE_PREFIX = "attr."


def reject_unknown(request: Request, allowed: Iterable[str], *, attributes: bool = False) -> None:
    known = set(allowed) | {"limit", "cursor"}
    for name in request.query_params:
        if name in known or (attributes and name.startswith(ATTRIBUTE_PREFIX)):
            continue
        hint = " (filter by attribute with attr.<key>=<value>)" if attributes else ""
        raise InvalidRequest(
            f"unknown query parameter {name[:60]!r}; use {', '.join(sorted(known))}{hint}",
            field=f"query.{name[:60]}",
        )


def attribute_filters(request: Request) -> dict[str, str]:
    return {
        name.removeprefix(ATTRIBUTE_PREFIX): value
        for name, value in request.query_params.items()
        if name.startswith(ATTRIBUTE_PREFIX)
    }
