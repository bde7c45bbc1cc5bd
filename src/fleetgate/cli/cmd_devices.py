"""fleetgate device …"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import click

from fleetgate.cli.common import client_from, fetch_pages, json_option, paging_options
from fleetgate.cli.output import emit, key_values

COLUMNS = [
    ("id", lambda d: d["id"]),
    ("name", lambda d: d["name"]),
    ("group", lambda d: d["group"]),
    ("status", lambda d: d["status"]),
    ("addresses", lambda d: d["addresses"]),
    ("attributes", lambda d: d["attributes"]),
]
FIELDS = (
    "id",
    "name",
    "group",
    "status",
    "addresses",
    "attributes",
    "routes",
    "created_at",
    "updated_at",
    "revision",
)


ROUTE_HELP = "Send this device's connections on LISTENER to DESTINATION; repeatable."


def _path(device_id: str) -> str:
    return f"/v1/devices/{quote(device_id, safe='')}"


@click.group("device")
def device() -> None:
    """Register and manage devices."""


@device.command("add")
@click.argument("device_id")
@click.option("--name", help="A name for people (default: the id).")
@click.option("--group", default="default", show_default=True)
@click.option("--attr", "attrs", multiple=True, metavar="KEY=VALUE", help="Repeatable.")
@click.option("--address", "addresses", multiple=True, help="IP address that identifies it.")
@click.option("--route", "routes", multiple=True, metavar="LISTENER=DESTINATION", help=ROUTE_HELP)
@click.option("--disabled", is_flag=True, help="Register it disabled.")
@json_option
@click.pass_context
def add(
    ctx: click.Context,
    device_id: str,
    name: str | None,
    group: str,
    attrs: tuple[str, ...],
    addresses: tuple[str, ...],
    routes: tuple[str, ...],
    disabled: bool,
    as_json: bool,
) -> None:
    """Register a device."""
    body: dict[str, Any] = {
        "id": device_id,
        "group": group,
        "attributes": key_values(attrs, "--attr"),
        "addresses": list(addresses),
        "routes": key_values(routes, "--route"),
        "status": "disabled" if disabled else "enabled",
    }
    if name is not None:
        body["name"] = name
    created = client_from(ctx).request("POST", "/v1/devices", json=body)
    emit(created, as_json, fields=FIELDS)


@device.command("list")
@click.option("--group")
@click.option("--status", type=click.Choice(["enabled", "disabled"]))
@click.option("--attr", "attrs", multiple=True, metavar="KEY=VALUE", help="Filter; repeatable.")
@click.option("--address")
@paging_options
@json_option
@click.pass_context
def list_(
    ctx: click.Context,
    group: str | None,
    status: str | None,
    attrs: tuple[str, ...],
    address: str | None,
    limit: int,
    cursor: str | None,
    fetch_all: bool,
    as_json: bool,
) -> None:
    """List devices, filtered by group, status, attribute or address."""
    params: list[tuple[str, str]] = []
    for key, value in (("group", group), ("status", status), ("address", address)):
        if value is not None:
            params.append((key, value))
    params.extend((f"attr.{k}", v) for k, v in key_values(attrs, "--attr").items())
    page = fetch_pages(
        client_from(ctx), "/v1/devices", params, limit=limit, cursor=cursor, fetch_all=fetch_all
    )
    emit(page, as_json, columns=COLUMNS)


@device.command("show")
@click.argument("device_id")
@json_option
@click.pass_context
def show(ctx: click.Context, device_id: str, as_json: bool) -> None:
    """Show one device."""
    emit(client_from(ctx).request("GET", _path(device_id)), as_json, fields=FIELDS)


def _patch(
    ctx: click.Context,
    device_id: str,
    body: dict[str, Any],
    as_json: bool,
    *,
    if_revision: int | None = None,
) -> None:
    headers = {"If-Match": f'"{if_revision}"'} if if_revision is not None else None
    updated = client_from(ctx).request("PATCH", _path(device_id), json=body, headers=headers)
    emit(updated, as_json, fields=FIELDS)


@device.command("update")
@click.argument("device_id")
@click.option("--name")
@click.option("--group")
@click.option("--attr", "attrs", multiple=True, metavar="KEY=VALUE", help="Set; repeatable.")
@click.option("--unset-attr", "unset", multiple=True, metavar="KEY", help="Remove; repeatable.")
@click.option("--address", "addresses", multiple=True, help="Replace the addresses (repeatable).")
@click.option("--clear-addresses", is_flag=True, help="Remove every address.")
@click.option("--route", "routes", multiple=True, metavar="LISTENER=DESTINATION", help=ROUTE_HELP)
@click.option(
    "--unset-route", "unset_routes", multiple=True, metavar="LISTENER", help="Remove; repeatable."
)
@click.option(
    "--clear-routes", is_flag=True, help="Remove every route (then add any --route given)."
)
@json_option
@click.pass_context
def update(
    ctx: click.Context,
    device_id: str,
    name: str | None,
    group: str | None,
    attrs: tuple[str, ...],
    unset: tuple[str, ...],
    addresses: tuple[str, ...],
    clear_addresses: bool,
    routes: tuple[str, ...],
    unset_routes: tuple[str, ...],
    clear_routes: bool,
    as_json: bool,
) -> None:
    """Change a device's name, group, attributes, addresses or routes."""
    body: dict[str, Any] = {}
    if name is not None:
        body["name"] = name
    if group is not None:
        body["group"] = group
    changes: dict[str, str | None] = dict(key_values(attrs, "--attr"))
    changes.update({key: None for key in unset})
    if changes:
        body["attributes"] = changes
    if addresses and clear_addresses:
        raise click.UsageError("give --address or --clear-addresses, not both")
    if addresses or clear_addresses:
        body["addresses"] = list(addresses)
    route_changes: dict[str, str | None] = {key: None for key in unset_routes}
    revision: int | None = None
    if clear_routes:
        # The API merges routes, so clearing names each current one; If-Match makes sure no
        # route added meanwhile survives unseen.
        current = client_from(ctx).request("GET", _path(device_id))
        route_changes.update({key: None for key in current["routes"]})
        revision = int(current["revision"])
    route_changes.update(key_values(routes, "--route"))
    if route_changes or clear_routes:
        body["routes"] = route_changes
    if not body:
        raise click.UsageError("nothing to change; see --help")
    _patch(ctx, device_id, body, as_json, if_revision=revision)


@device.command("disable")
@click.argument("device_id")
@json_option
@click.pass_context
def disable(ctx: click.Context, device_id: str, as_json: bool) -> None:
    """Refuse the device's connections from now on."""
    _patch(ctx, device_id, {"status": "disabled"}, as_json)


@device.command("enable")
@click.argument("device_id")
@json_option
@click.pass_context
def enable(ctx: click.Context, device_id: str, as_json: bool) -> None:
    """Accept the device's connections again."""
    _patch(ctx, device_id, {"status": "enabled"}, as_json)


@device.command("replace")
@click.argument("old_id")
@click.option("--with", "new_id", required=True, help="The new device's id (made if absent).")
@click.option("--name")
@click.option(
    "--address",
    "addresses",
    multiple=True,
    help="The new device's addresses (default: the old one's).",
)
@click.option(
    "--attr",
    "attrs",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a moved attribute (e.g. the new unit's serial).",
)
@json_option
@click.pass_context
def replace(
    ctx: click.Context,
    old_id: str,
    new_id: str,
    name: str | None,
    addresses: tuple[str, ...],
    attrs: tuple[str, ...],
    as_json: bool,
) -> None:
    """Swap a device for a new one that inherits its identity and rights."""
    body: dict[str, Any] = {"with": new_id, "name": name}
    if addresses:
        body["addresses"] = list(addresses)
    if attrs:
        body["attributes"] = key_values(attrs, "--attr")
    done = client_from(ctx).request("POST", f"{_path(old_id)}/replace", json=body)
    if as_json:
        emit(done, True)
        return
    click.echo(
        f"{old_id} -> {new_id}: {len(done['revoked'])} certificate(s) revoked, "
        f"{len(done['reissued'])} re-issued, {len(done['rebound'])} credential(s) moved"
    )


@device.command("delete")
@click.argument("device_id")
@click.pass_context
def delete(ctx: click.Context, device_id: str) -> None:
    """Remove a device from the registry."""
    client_from(ctx).request("DELETE", _path(device_id))
    click.echo(f"deleted device {device_id}")
