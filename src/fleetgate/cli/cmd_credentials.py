"""fleetgate credential …"""

from __future__ import annotations

import getpass
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

import click

from fleetgate.cli.client import CliFailure
from fleetgate.cli.common import client_from, fetch_pages, json_option, paging_options
from fleetgate.cli.output import emit, key_values
from fleetgate.errors import kind_for_slug

COLUMNS = [
    ("id", lambda c: c["id"]),
    ("kind", lambda c: c["kind"]),
    ("device", lambda c: c["device_id"]),
    ("public", lambda c: c["public"]),
    ("not_after", lambda c: c["not_after"]),
]
FIELDS = (
    "id",
    "kind",
    "description",
    "device_id",
    "public",
    "has_secret",
    "certificate_serial",
    "not_after",
    "exported_at",
    "created_at",
    "updated_at",
    "revision",
)


def _path(credential_id: str) -> str:
    return f"/v1/credentials/{quote(credential_id, safe='')}"


def _read_secret(secret_file: Any, prompt: bool) -> str | None:
    if secret_file is not None:
        text: str = secret_file.read()
        return text.rstrip("\n") if not text.startswith("-----") else text
    if prompt:
        return getpass.getpass("secret: ")
    return None


@click.group("credential")
def credential() -> None:
    """The credential store (secrets are write-only)."""


@credential.command("add")
@click.argument("credential_id")
@click.option(
    "--kind", type=click.Choice(["x509", "password", "psk", "hmac", "api_token"]), required=True
)
@click.option("--device", "device_id")
@click.option("--description", default="")
@click.option(
    "--public",
    "public",
    multiple=True,
    metavar="KEY=VALUE",
    help="username=…, identity=…, key_id=…",
)
@click.option(
    "--secret-file",
    type=click.File("r"),
    help="Read the secret (or the x509 private key PEM) from a file; - for stdin.",
)
@click.option("--cert", "cert_file", type=click.File("r"), help="x509: the certificate PEM.")
@click.option("--chain", "chain_file", type=click.File("r"), help="x509: the CA chain PEM.")
@json_option
@click.pass_context
def add(
    ctx: click.Context,
    credential_id: str,
    kind: str,
    device_id: str | None,
    description: str,
    public: tuple[str, ...],
    secret_file: Any,
    cert_file: Any,
    chain_file: Any,
    as_json: bool,
) -> None:
    """Store a credential. Without --secret-file, the secret is asked for (not echoed)."""
    body: dict[str, Any] = {
        "id": credential_id,
        "kind": kind,
        "device_id": device_id,
        "description": description,
        "public": key_values(public, "--public"),
        "secret": _read_secret(secret_file, prompt=True),
        "certificate_pem": cert_file.read() if cert_file else None,
        "chain_pem": chain_file.read() if chain_file else None,
    }
    emit(client_from(ctx).request("POST", "/v1/credentials", json=body), as_json, fields=FIELDS)


@credential.command("list")
@click.option("--device", "device_id")
@click.option("--kind", type=click.Choice(["x509", "password", "psk", "hmac", "api_token"]))
@paging_options
@json_option
@click.pass_context
def list_(
    ctx: click.Context,
    device_id: str | None,
    kind: str | None,
    limit: int,
    cursor: str | None,
    fetch_all: bool,
    as_json: bool,
) -> None:
    params = [(k, v) for k, v in (("device_id", device_id), ("kind", kind)) if v is not None]
    page = fetch_pages(
        client_from(ctx), "/v1/credentials", params, limit=limit, cursor=cursor, fetch_all=fetch_all
    )
    emit(page, as_json, columns=COLUMNS)


@credential.command("show")
@click.argument("credential_id")
@json_option
@click.pass_context
def show(ctx: click.Context, credential_id: str, as_json: bool) -> None:
    emit(client_from(ctx).request("GET", _path(credential_id)), as_json, fields=FIELDS)


@credential.command("update")
@click.argument("credential_id")
@click.option("--description")
@click.option("--public", "public", multiple=True, metavar="KEY=VALUE")
@click.option("--secret-file", type=click.File("r"), help="Replace the secret.")
@json_option
@click.pass_context
def update(
    ctx: click.Context,
    credential_id: str,
    description: str | None,
    public: tuple[str, ...],
    secret_file: Any,
    as_json: bool,
) -> None:
    body: dict[str, Any] = {}
    if description is not None:
        body["description"] = description
    if public:
        body["public"] = key_values(public, "--public")
    secret = _read_secret(secret_file, prompt=False)
    if secret is not None:
        body["secret"] = secret
    if not body:
        raise click.UsageError("nothing to change; see --help")
    emit(client_from(ctx).request("PATCH", _path(credential_id), json=body), as_json, fields=FIELDS)


@credential.command("delete")
@click.argument("credential_id")
@click.pass_context
def delete(ctx: click.Context, credential_id: str) -> None:
    client_from(ctx).request("DELETE", _path(credential_id))
    click.echo(f"deleted credential {credential_id}")


@credential.command("export")
@click.argument("credential_id")
@click.option(
    "--format", "fmt", type=click.Choice(["pem", "pkcs12"]), default="pem", show_default=True
)
@click.option(
    "--out",
    "out_path",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="Written 0600; must not exist yet.",
)
@click.option("--password-file", type=click.File("r"), help="PKCS#12 password (else asked).")
@click.pass_context
def export(
    ctx: click.Context, credential_id: str, fmt: str, out_path: Path, password_file: Any
) -> None:
    """Write an x509 credential's key, certificate and chain, once."""
    if out_path.exists():
        raise click.UsageError(f"{out_path} exists; the key is exported once, to a new file")
    # Open the file before asking, so a bad path costs nothing; the key itself leaves
    # fleetgate only once, so it must land on disk.
    try:
        fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise click.UsageError(f"cannot create {out_path}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as out:
        try:
            body: dict[str, Any] = {"format": fmt}
            if fmt == "pkcs12":
                body["password"] = (
                    password_file.read().rstrip("\n")
                    if password_file
                    else getpass.getpass("password: ")
                )
            data = client_from(ctx).request_bytes(
                "POST", f"{_path(credential_id)}/export", json=body
            )
        except BaseException:
            out_path.unlink()  # still empty: nothing was exported
            raise
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    click.echo(
        f"wrote {len(data)} bytes to {out_path} (mode 0600); fleetgate will not export this key "
        "again",
        err=True,
    )


@credential.command("resolve")
@click.argument("template")
@click.option("--device", "device_id", required=True)
@click.option("--default", "default")
@json_option
@click.pass_context
def resolve(
    ctx: click.Context, template: str, device_id: str, default: str | None, as_json: bool
) -> None:
    """Which credential TEMPLATE (like 'aws-#{imsi}') names for a device."""
    params = [("template", template)] + ([("default", default)] if default else [])
    found = client_from(ctx).request(
        "GET", f"/v1/devices/{quote(device_id, safe='')}/credentials/resolve", params=params
    )
    if as_json:
        emit(found, True)
    else:
        chosen = found["credential"]["id"] if found["credential"] else "(none)"
        click.echo(f"{found['template']} -> {found['expanded']} -> {chosen}")
    if not found["credential"]:
        raise CliFailure(
            "no credential for this device: neither the template's nor the default exists "
            "(or it belongs to another device)",
            kind_for_slug("not-found").exit_code,
        )
