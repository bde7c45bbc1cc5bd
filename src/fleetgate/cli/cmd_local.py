"""Commands that work on the data directory itself: serve, config check, keys."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from fleetgate.cli.client import CliFailure
from fleetgate.cli.local import open_local
from fleetgate.cli.output import emit
from fleetgate.datadir import DEFAULT_DATA_DIR
from fleetgate.errors import FleetgateError

# The heavy modules (the server, pydantic, the store, cryptography through fleetgate.sealing)
# load inside the commands that use them, so API commands such as `fleetgate device list` and
# `fleetgate --help` start quickly.


def data_option[F: Callable[..., Any]](fn: F) -> F:
    fn = click.option(
        "--config",
        "config_path",
        type=click.Path(path_type=Path, dir_okay=False),
        envvar="FLEETGATE_CONFIG",
        help="Config file (default: DATA/fleetgate.toml).",
    )(fn)
    return click.option(
        "--data",
        "data_dir",
        type=click.Path(path_type=Path, file_okay=False),
        default=DEFAULT_DATA_DIR,
        envvar="FLEETGATE_DATA",
        show_default=True,
        help="Data directory (env FLEETGATE_DATA).",
    )(fn)


def _fail(exc: FleetgateError) -> CliFailure:
    return CliFailure(exc.detail, exc.kind.exit_code)


@click.command("serve")
@data_option
def serve_command(data_dir: Path, config_path: Path | None) -> None:
    """Run the gateway: API and listeners, until SIGTERM."""
    from fleetgate.runtime import ServeOptions, serve

    try:
        code = serve(ServeOptions(data_dir=data_dir, config_path=config_path, env=dict(os.environ)))
    except FleetgateError as exc:
        raise _fail(exc) from None
    raise SystemExit(code)


@click.group("config")
def config_group() -> None:
    """Inspect the configuration."""


@config_group.command("check")
@data_option
def config_check(data_dir: Path, config_path: Path | None) -> None:
    """Validate the configuration (with FLEETGATE_* overrides) without starting."""
    from fleetgate.config import load_config
    from fleetgate.errors import ConfigError

    path = config_path or (data_dir / "fleetgate.toml")
    try:
        load_config(path, dict(os.environ))
    except ConfigError as exc:
        raise _fail(exc) from None
    click.echo(f"{path}: ok")


@click.group("keys")
def keys_group() -> None:
    """Master sealing keys."""


async def _rotate(data_dir: Path, config_path: Path | None, keep_old: bool) -> dict[str, object]:
    from fleetgate.sealing import MasterKey
    from fleetgate.sealing.keyring import ENV_VAR as MASTER_KEY_ENV
    from fleetgate.services.context import SYSTEM_CALLER

    async with open_local(data_dir, config_path) as local:
        keyring, services = local.keyring, local.services
        from_env = bool(local.env.get(MASTER_KEY_ENV, "").strip())
        key_path = local.data.resolve(local.config.sealing.master_key_file)
        if not from_env:
            # Step 1: the new key joins the file before anything is sealed under it.
            keyring.write_file(key_path, [*keyring.all_keys(), MasterKey.generate()])
        report = await services.vault.reseal_all(SYSTEM_CALLER)
        unused = list(report.retired_key_ids)
        removed: list[str] = []
        if not from_env and not keep_old:
            # Step 3: drop old keys, except any that another process sealed with meanwhile.
            in_use = await services.vault.key_usage()
            keep = [
                k for k in keyring.all_keys() if k.key_id == report.key_id or k.key_id in in_use
            ]
            keyring.write_file(key_path, keep)
            removed = [k for k in unused if k not in in_use]
            unused = []
        return {
            "active_key_id": report.key_id,
            "resealed": report.resealed,
            "removed_key_ids": removed,
            "unused_key_ids": unused,
            "key_source": MASTER_KEY_ENV if from_env else str(key_path),
        }


@keys_group.command("rotate")
@data_option
@click.option("--keep-old", is_flag=True, help="Keep retired keys in the key file.")
@click.option("--json", "as_json", is_flag=True)
def keys_rotate(data_dir: Path, config_path: Path | None, keep_old: bool, as_json: bool) -> None:
    """Seal everything under a new master key.

    With a key file: a new key is added, every secret is re-sealed under it, and the old keys
    are removed from the file (unless --keep-old). With FLEETGATE_MASTER_KEY: put the new key
    first in the variable (new,old), run this, then drop the old one.
    """
    import asyncio  # 40 ms of start-up that only this command needs

    try:
        result = asyncio.run(_rotate(data_dir, config_path, keep_old))
    except FleetgateError as exc:
        raise _fail(exc) from None
    emit(
        result,
        as_json,
        fields=("active_key_id", "resealed", "removed_key_ids", "unused_key_ids", "key_source"),
    )
    if result["removed_key_ids"]:
        click.echo(
            "note: the removed keys are gone from the key file; database backups taken before "
            "now need a copy of the old key file (or rotate with --keep-old)",
            err=True,
        )
