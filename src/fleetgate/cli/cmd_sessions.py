"""fleetgate session …"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

import click

from fleetgate.cli.common import client_from, fetch_pages, json_option, paging_options
from fleetgate.cli.output import emit

COLUMNS = [
    ("id", lambda s: s["id"]),
    ("device", lambda s: s["device_id"]),
    ("port", lambda s: s["device_port"]),
    ("public", lambda s: f"{s['public_host']}:{s['public_port']}"),
    ("tls", lambda s: "mtls" if s["mtls"] else "tls" if s["tls"] else "plain"),
    ("from", lambda s: s["cidrs"]),
    ("expires_at", lambda s: s["expires_at"]),
    ("state", lambda s: s["state"]),
]
FIELDS = (
    "id",
    "device_id",
    "device_port",
    "public_host",
    "public_port",
    "tls",
    "mtls",
    "cidrs",
    "created_at",
    "expires_at",
    "state",
    "ended_at",
    "end_reason",
)
EVENT_COLUMNS = [
    ("at", lambda e: e["at"]),
    ("kind", lambda e: e["kind"]),
    ("source", lambda e: e["source"]),
    ("destination", lambda e: e["destination"]),
    ("detail", lambda e: e["detail"].get("diagnosis") or e["detail"]),
]
_DURATION = re.compile(r"^(\d+)([smh]?)$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600}


def parse_duration(text: str) -> int:
    """``90``, ``90s``, ``15m`` or ``2h`` in seconds."""
    found = _DURATION.match(text.strip())
    if found is None:
        raise click.BadParameter(f"{text!r}: a number of seconds, or like 15m or 2h")
    return int(found.group(1)) * _UNIT_S[found.group(2)]


def _path(session_id: str) -> str:
    return f"/v1/sessions/{quote(session_id, safe='')}"


@click.group("session")
def session() -> None:
    """Remote access: map a public port to a device's port, for a while."""


@session.command("open")
@click.argument("device_id")
@click.option("--port", type=click.IntRange(1, 65535), required=True, help="The device's port.")
@click.option("--for", "duration", help="How long: 90s, 15m, 2h (default: the gateway's).")
@click.option(
    "--from",
    "cidrs",
    multiple=True,
    metavar="CIDR",
    help="Sources allowed to connect; repeatable (default: the address you call from).",
)
@click.option("--tls", is_flag=True, help="Terminate TLS at fleetgate (clients speak TLS).")
@click.option(
    "--mtls",
    is_flag=True,
    help="--tls, and admit only a client certificate minted for this session "
    "(fleetgate connect --session fetches it).",
)
@click.option("--ca-out", type=click.Path(dir_okay=False), help="tls: write the CA here.")
@json_option
@click.pass_context
def open_(
    ctx: click.Context,
    device_id: str,
    port: int,
    duration: str | None,
    cidrs: tuple[str, ...],
    tls: bool,
    mtls: bool,
    ca_out: str | None,
    as_json: bool,
) -> None:
    """Open a session to DEVICE_ID's PORT."""
    body: dict[str, Any] = {"device_id": device_id, "port": port, "tls": tls or mtls}
    if mtls:
        body["mtls"] = True
    if duration is not None:
        body["duration_s"] = parse_duration(duration)
    if cidrs:
        body["cidrs"] = list(cidrs)
    opened = client_from(ctx).request("POST", "/v1/sessions", json=body)
    if ca_out and opened.get("ca_pem"):
        Path(ca_out).write_text(opened["ca_pem"], encoding="ascii")
    emit(opened, as_json, fields=FIELDS)


@session.command("list")
@click.option("--device", "device_id")
@click.option("--open", "open_only", is_flag=True, help="Only sessions still open.")
@paging_options
@json_option
@click.pass_context
def list_(
    ctx: click.Context,
    device_id: str | None,
    open_only: bool,
    limit: int,
    cursor: str | None,
    fetch_all: bool,
    as_json: bool,
) -> None:
    """List sessions."""
    params: list[tuple[str, str]] = []
    if device_id:
        params.append(("device_id", device_id))
    if open_only:
        params.append(("state", "open"))
    page = fetch_pages(
        client_from(ctx),
        "/v1/sessions",
        params,
        limit=limit,
        cursor=cursor,
        fetch_all=fetch_all,
    )
    emit(page, as_json, columns=COLUMNS)


@session.command("get")
@click.argument("session_id")
@json_option
@click.pass_context
def get(ctx: click.Context, session_id: str, as_json: bool) -> None:
    """Show one session."""
    emit(client_from(ctx).request("GET", _path(session_id)), as_json, fields=FIELDS)


@session.command("close")
@click.argument("session_id")
@json_option
@click.pass_context
def close(ctx: click.Context, session_id: str, as_json: bool) -> None:
    """Close a session now: its port stops listening, live connections are cut."""
    emit(client_from(ctx).request("DELETE", _path(session_id)), as_json, fields=FIELDS)


@session.command("events")
@click.argument("session_id")
@paging_options
@json_option
@click.pass_context
def events(
    ctx: click.Context,
    session_id: str,
    limit: int,
    cursor: str | None,
    fetch_all: bool,
    as_json: bool,
) -> None:
    """What happened to a session, oldest first (REFUSED events say why)."""
    page = fetch_pages(
        client_from(ctx),
        f"{_path(session_id)}/events",
        [],
        limit=limit,
        cursor=cursor,
        fetch_all=fetch_all,
    )
    emit(page, as_json, columns=EVENT_COLUMNS)
