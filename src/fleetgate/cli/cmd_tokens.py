"""fleetgate token …"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import click

from fleetgate.cli.common import client_from, fetch_pages, json_option, paging_options
from fleetgate.cli.output import emit, parse_duration_s

COLUMNS = [
    ("id", lambda t: t["id"]),
    ("name", lambda t: t["name"]),
    ("role", lambda t: t["role"]),
    ("groups", lambda t: t["groups"] or "(all)"),
    ("expires_at", lambda t: t["expires_at"]),
]
FIELDS = ("id", "name", "role", "groups", "created_at", "expires_at", "created_by")


@click.group("token")
def token() -> None:
    """Manage API tokens."""


@token.command("create")
@click.option("--name", required=True)
@click.option("--role", type=click.Choice(["admin", "operator", "viewer"]), required=True)
@click.option("--group", "groups", multiple=True, help="Limit to this group; repeatable.")
@click.option("--expires-in", help="Lifetime, like 12h or 90d (default: no expiry).")
@json_option
@click.pass_context
def create(
    ctx: click.Context,
    name: str,
    role: str,
    groups: tuple[str, ...],
    expires_in: str | None,
    as_json: bool,
) -> None:
    """Mint a token. Its secret is printed once."""
    body: dict[str, Any] = {"name": name, "role": role, "groups": list(groups)}
    if expires_in:
        body["expires_in_s"] = parse_duration_s(expires_in)
    created = client_from(ctx).request("POST", "/v1/tokens", json=body)
    if as_json:
        emit(created, True)
        return
    emit(created["token"], False, fields=FIELDS)
    click.echo(f"\nsecret (shown once): {created['secret']}")


@token.command("list")
@paging_options
@json_option
@click.pass_context
def list_(
    ctx: click.Context, limit: int, cursor: str | None, fetch_all: bool, as_json: bool
) -> None:
    """List tokens (never their secrets)."""
    page = fetch_pages(
        client_from(ctx), "/v1/tokens", [], limit=limit, cursor=cursor, fetch_all=fetch_all
    )
    emit(page, as_json, columns=COLUMNS)


@token.command("show")
@click.argument("token_id")
@json_option
@click.pass_context
def show(ctx: click.Context, token_id: str, as_json: bool) -> None:
    """Show one token."""
    found = client_from(ctx).request("GET", f"/v1/tokens/{quote(token_id, safe='')}")
    emit(found, as_json, fields=FIELDS)


@token.command("revoke")
@click.argument("token_id")
@click.pass_context
def revoke(ctx: click.Context, token_id: str) -> None:
    """Delete a token; it stops working at once."""
    client_from(ctx).request("DELETE", f"/v1/tokens/{quote(token_id, safe='')}")
    click.echo(f"revoked token {token_id}")


@token.command("whoami")
@json_option
@click.pass_context
def whoami(ctx: click.Context, as_json: bool) -> None:
    """Show the token this CLI is using."""
    emit(
        client_from(ctx).request("GET", "/v1/whoami"),
        as_json,
        fields=("token_id", "name", "role", "groups"),
    )
