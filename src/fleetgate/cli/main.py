"""``fleetgate``: the root command."""

from __future__ import annotations

import click

from fleetgate import __version__
from fleetgate.cli.cmd_audit import audit
from fleetgate.cli.cmd_connect import connect_command
from fleetgate.cli.cmd_credentials import credential
from fleetgate.cli.cmd_devices import device
from fleetgate.cli.cmd_groups import group
from fleetgate.cli.cmd_local import config_group, keys_group, serve_command
from fleetgate.cli.cmd_pki import ca, cert
from fleetgate.cli.cmd_sessions import session
from fleetgate.cli.cmd_tokens import token


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fleetgate")
@click.option(
    "--url",
    envvar="FLEETGATE_URL",
    help="API base URL (env FLEETGATE_URL; default http://127.0.0.1:8080).",
)
@click.option("--token", envvar="FLEETGATE_TOKEN", help="API token (env FLEETGATE_TOKEN).")
def cli(url: str | None, token: str | None) -> None:
    """fleetgate: secure connectivity gateway for IoT fleets.

    API commands read --url/--token, then FLEETGATE_URL/FLEETGATE_TOKEN, then
    ~/.config/fleetgate/cli.toml (keys: url, token).
    """


for command in (
    serve_command,
    config_group,
    keys_group,
    device,
    group,
    token,
    audit,
    ca,
    cert,
    credential,
    session,
    connect_command,
):
    cli.add_command(command)


def main() -> None:
    cli(prog_name="fleetgate")
