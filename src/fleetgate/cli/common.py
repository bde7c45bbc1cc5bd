"""What every API command shares: the client from the root options, and --json."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from fleetgate.cli.client import ApiClient

F = TypeVar("F", bound=Callable[..., Any])


def client_from(ctx: click.Context) -> ApiClient:
    root = ctx.find_root()
    options = root.params
    return ApiClient.resolve(options.get("url"), options.get("token"))


def json_option[F: Callable[..., Any]](fn: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(fn)


def paging_options[F: Callable[..., Any]](fn: F) -> F:
    fn = click.option("--all", "fetch_all", is_flag=True, help="Follow every page.")(fn)
    fn = click.option("--cursor", default=None, help="Continue from a previous page.")(fn)
    fn = click.option("--limit", type=click.IntRange(1, 500), default=100, show_default=True)(fn)
    return fn


def fetch_pages(
    client: ApiClient,
    path: str,
    params: list[tuple[str, str]],
    *,
    limit: int,
    cursor: str | None,
    fetch_all: bool,
) -> dict[str, Any]:
    items: list[Any] = []
    next_cursor = cursor
    while True:
        query = [*params, ("limit", str(limit))]
        if next_cursor:
            query.append(("cursor", next_cursor))
        page = client.request("GET", path, params=query)
        items.extend(page["items"])
        next_cursor = page.get("next_cursor")
        if not fetch_all or not next_cursor:
            return {"items": items, "next_cursor": next_cursor}
