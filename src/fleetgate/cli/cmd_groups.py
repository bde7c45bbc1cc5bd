"""fleetgate group …"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import click

from fleetgate.cli.common import client_from, fetch_pages, json_option, paging_options
from fleetgate.cli.output import emit

COLUMNS = [
    ("name", lambda g: g["name"]),
    ("description", lambda g: g["description"]),
    ("revision", lambda g: g["revision"]),
]
FIELDS = ("name", "description", "settings", "created_at", "updated_at", "revision")


def _settings(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--settings") from None
    if not isinstance(value, dict):
        raise click.BadParameter("must be a JSON object", param_hint="--settings")
    return value


@click.group("group")
def group() -> None:
    """Manage device groups."""


@group.command("add")
@click.argument("name")
@click.option("--description", default="")
@click.option("--settings", help="JSON object.")
@json_option
@click.pass_context
def add(
    ctx: click.Context, name: str, description: str, settings: str | None, as_json: bool
) -> None:
    """Create a group."""
    body = {"name": name, "description": description, "settings": _settings(settings) or {}}
    emit(client_from(ctx).request("POST", "/v1/groups", json=body), as_json, fields=FIELDS)


@group.command("list")
@paging_options
@json_option
@click.pass_context
def list_(
    ctx: click.Context, limit: int, cursor: str | None, fetch_all: bool, as_json: bool
) -> None:
    """List groups."""
    page = fetch_pages(
        client_from(ctx), "/v1/groups", [], limit=limit, cursor=cursor, fetch_all=fetch_all
    )
    emit(page, as_json, columns=COLUMNS)


@group.command("show")
@click.argument("name")
@json_option
@click.pass_context
def show(ctx: click.Context, name: str, as_json: bool) -> None:
    """Show one group."""
    found = client_from(ctx).request("GET", f"/v1/groups/{quote(name, safe='')}")
    emit(found, as_json, fields=FIELDS)


@group.command("update")
@click.argument("name")
@click.option("--description")
@click.option("--settings", help="JSON object; replaces the current settings.")
@json_option
@click.pass_context
def update(
    ctx: click.Context, name: str, description: str | None, settings: str | None, as_json: bool
) -> None:
    """Change a group's description or settings."""
    body: dict[str, Any] = {}
    if description is not None:
        body["description"] = description
    parsed = _settings(settings)
    if parsed is not None:
        body["settings"] = parsed
    if not body:
        raise click.UsageError("nothing to change; see --help")
    updated = client_from(ctx).request("PATCH", f"/v1/groups/{quote(name, safe='')}", json=body)
    emit(updated, as_json, fields=FIELDS)


@group.command("delete")
@click.argument("name")
@click.pass_context
def delete(ctx: click.Context, name: str) -> None:
    """Delete an empty group."""
    client_from(ctx).request("DELETE", f"/v1/groups/{quote(name, safe='')}")
    click.echo(f"deleted group {name}")
