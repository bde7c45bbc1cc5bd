"""fleetgate audit"""

from __future__ import annotations

import click

from fleetgate.cli.common import client_from, fetch_pages, json_option, paging_options
from fleetgate.cli.output import emit

COLUMNS = [
    ("id", lambda e: e["id"]),
    ("at", lambda e: e["at"]),
    ("actor", lambda e: e["actor"]),
    ("action", lambda e: e["action"]),
    ("target", lambda e: f"{e['target_type']}/{e['target_id']}"),
    ("source", lambda e: e["source"]),
]


@click.command("audit")
@click.option("--action", help="Like device.update.")
@click.option(
    "--target-type",
    help="device, group, token, session, certificate, credential, ca, connection, master_key.",
)
@click.option("--target-id")
@click.option("--actor", help="Like token:tok_….")
@click.option("--since", help="ISO 8601 time.")
@click.option("--until", help="ISO 8601 time.")
@paging_options
@json_option
@click.pass_context
def audit(
    ctx: click.Context,
    action: str | None,
    target_type: str | None,
    target_id: str | None,
    actor: str | None,
    since: str | None,
    until: str | None,
    limit: int,
    cursor: str | None,
    fetch_all: bool,
    as_json: bool,
) -> None:
    """Read the audit log, newest first."""
    params = [
        (key, value)
        for key, value in (
            ("action", action),
            ("target_type", target_type),
            ("target_id", target_id),
            ("actor", actor),
            ("since", since),
            ("until", until),
        )
        if value is not None
    ]
    page = fetch_pages(
        client_from(ctx), "/v1/audit", params, limit=limit, cursor=cursor, fetch_all=fetch_all
    )
    emit(page, as_json, columns=COLUMNS)
