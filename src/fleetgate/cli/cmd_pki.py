"""fleetgate ca … and fleetgate cert …"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

import click

from fleetgate.cli.client import CliFailure
from fleetgate.cli.common import client_from, fetch_pages, json_option, paging_options
from fleetgate.cli.local import open_local
from fleetgate.cli.output import emit
from fleetgate.errors import FleetgateError

CA_COLUMNS = [
    ("id", lambda c: c["id"]),
    ("role", lambda c: c["role"] + (" (active)" if c["active"] else "")),
    ("key", lambda c: "held" if c["key_held"] else "-"),
    ("not_after", lambda c: c["not_after"]),
    ("subject", lambda c: c["subject"]),
]
CERT_COLUMNS = [
    ("serial", lambda c: c["serial"]),
    ("subject", lambda c: c["subject"]),
    ("device", lambda c: c["device_id"]),
    ("profile", lambda c: c["profile"]),
    ("status", lambda c: c["status"]),
    ("not_after", lambda c: c["not_after"]),
]
CERT_FIELDS = (
    "serial",
    "subject",
    "sans",
    "device_id",
    "credential_id",
    "profile",
    "issuer_id",
    "key_algorithm",
    "not_before",
    "not_after",
    "status",
    "revoked_at",
    "revocation_reason",
    "renewed_by",
)
INVENTORY_COLUMNS = [
    ("kind", lambda i: i["kind"]),
    ("id", lambda i: i["id"]),
    ("subject", lambda i: i["subject"]),
    ("not_after", lambda i: i["not_after"]),
    ("days_left", lambda i: f"{i['expires_in_s'] / 86400:.1f}"),
    ("auto_renew", lambda i: "yes" if i["renews_automatically"] else "no"),
]
ALGORITHMS = click.Choice(["ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "rsa-4096", "ed25519"])


@click.group("ca")
def ca() -> None:
    """The certificate authority."""


async def _init(data_dir: Path, config_path: Path | None, algorithm: str | None) -> dict[str, Any]:
    from fleetgate.pki.keys import KeyAlgorithm
    from fleetgate.services.context import SYSTEM_CALLER

    async with open_local(data_dir, config_path) as local:
        services = local.services
        created = await services.authority.ensure_hierarchy(
            SYSTEM_CALLER, KeyAlgorithm(algorithm) if algorithm else None
        )
        return {
            "created": created,
            "authorities": [
                {
                    "id": a.id,
                    "role": a.role.value,
                    "active": a.active,
                    "subject": a.certificate.subject.rfc4514_string(),
                }
                for a in await services.authority.authorities()
            ],
        }


@ca.command("init")
@click.option(
    "--data",
    "data_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default="./fleetgate-data",
    envvar="FLEETGATE_DATA",
    show_default=True,
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="FLEETGATE_CONFIG",
)
@click.option("--algorithm", type=ALGORITHMS, help="Default: pki.key_algorithm (ec-p256).")
@json_option
def ca_init(data_dir: Path, config_path: Path | None, algorithm: str | None, as_json: bool) -> None:
    """Create the root and issuing CA in a data directory (serve does this on first start).

    Does nothing when an issuing CA exists already."""
    import asyncio  # 40 ms of start-up that only this command needs

    try:
        result = asyncio.run(_init(data_dir, config_path, algorithm))
    except FleetgateError as exc:
        raise CliFailure(exc.detail, exc.kind.exit_code) from None
    if as_json:
        emit(result, True)
        return
    click.echo("created" if result["created"] else "a CA exists already; nothing changed")
    emit(
        {"items": result["authorities"]},
        False,
        columns=[
            ("id", lambda a: a["id"]),
            ("role", lambda a: a["role"]),
            ("active", lambda a: a["active"]),
            ("subject", lambda a: a["subject"]),
        ],
    )


@ca.command("list")
@json_option
@click.pass_context
def ca_list(ctx: click.Context, as_json: bool) -> None:
    """Roots, issuing CAs and trusted outside CAs."""
    emit(client_from(ctx).request("GET", "/v1/ca"), as_json, columns=CA_COLUMNS)


@ca.command("rotate")
@json_option
@click.pass_context
def ca_rotate(ctx: click.Context, as_json: bool) -> None:
    """Start a new issuing CA under the root (the old one keeps answering for its own)."""
    created = client_from(ctx).request("POST", "/v1/ca/rotate")
    emit(created, as_json, fields=("id", "role", "subject", "not_after"))


@ca.command("import")
@click.option("--cert", "cert_file", type=click.File("r"), required=True)
@click.option("--key", "key_file", type=click.File("r"), required=True)
@click.option("--chain", "chain_file", type=click.File("r"), help="Up to the root.")
@json_option
@click.pass_context
def ca_import(
    ctx: click.Context, cert_file: Any, key_file: Any, chain_file: Any, as_json: bool
) -> None:
    """Issue from an existing CA (its key is sealed in the store)."""
    body = {
        "certificate_pem": cert_file.read(),
        "key_pem": key_file.read(),
        "chain_pem": chain_file.read() if chain_file else None,
    }
    created = client_from(ctx).request("POST", "/v1/ca/import", json=body)
    emit(created, as_json, fields=("id", "role", "subject", "not_after"))


@ca.command("trust")
@click.option("--cert", "cert_file", type=click.File("r"), required=True)
@click.option("--name", default="")
@json_option
@click.pass_context
def ca_trust(ctx: click.Context, cert_file: Any, name: str, as_json: bool) -> None:
    """Trust an outside CA (a manufacturer's) to authenticate devices."""
    body = {"certificate_pem": cert_file.read(), "name": name}
    created = client_from(ctx).request("POST", "/v1/ca/trust", json=body)
    emit(created, as_json, fields=("id", "role", "subject", "not_after"))


@click.group("cert")
def cert() -> None:
    """Device certificates, revocation and the expiry inventory."""


@cert.command("issue")
@click.argument("device_id")
@click.option("--csr", "csr_file", type=click.File("r"), help="The device's PKCS#10 request.")
@click.option(
    "--generate-key",
    "algorithm",
    type=ALGORITHMS,
    help="Have fleetgate make the key (kept sealed; export it once).",
)
@click.option("--credential", "credential_id", help="With --generate-key: credential id.")
@click.option("--days", "lifetime_days", type=click.IntRange(1, 3650))
@click.option("--out", "out_file", type=click.File("w"), help="Write certificate + chain here.")
@json_option
@click.pass_context
def cert_issue(
    ctx: click.Context,
    device_id: str,
    csr_file: Any,
    algorithm: str | None,
    credential_id: str | None,
    lifetime_days: int | None,
    out_file: Any,
    as_json: bool,
) -> None:
    """Issue a device client certificate."""
    if (csr_file is None) == (algorithm is None):
        raise click.UsageError("give --csr FILE or --generate-key ALGORITHM")
    body: dict[str, Any] = {"lifetime_days": lifetime_days}
    if csr_file is not None:
        body["csr"] = csr_file.read()
    else:
        body["generate_key"] = {"algorithm": algorithm, "credential_id": credential_id}
    issued = client_from(ctx).request(
        "POST", f"/v1/devices/{quote(device_id, safe='')}/certificates", json=body
    )
    if out_file is not None:
        out_file.write(issued["certificate_pem"] + issued["chain_pem"])
    if as_json:
        emit(issued, True)
        return
    emit(issued["certificate"], False, fields=CERT_FIELDS)
    if issued.get("credential_id"):
        click.echo(
            f"\nkey sealed in credential {issued['credential_id']}; export it once with "
            f"`fleetgate credential export {issued['credential_id']}`"
        )


@cert.command("issue-gateway")
@click.argument("credential_id")
@click.option(
    "--profile",
    type=click.Choice(["gateway_server", "upstream_client"]),
    default="gateway_server",
    show_default=True,
)
@click.option("--cn", "common_name", required=True)
@click.option("--dns", "dns_names", multiple=True)
@click.option("--ip", "ip_addresses", multiple=True)
@click.option("--algorithm", type=ALGORITHMS, default="ec-p256", show_default=True)
@click.option("--days", "lifetime_days", type=click.IntRange(1, 825))
@json_option
@click.pass_context
def cert_issue_gateway(
    ctx: click.Context,
    credential_id: str,
    profile: str,
    common_name: str,
    dns_names: tuple[str, ...],
    ip_addresses: tuple[str, ...],
    algorithm: str,
    lifetime_days: int | None,
    as_json: bool,
) -> None:
    """A certificate for the gateway itself, kept and renewed in credential CREDENTIAL_ID."""
    body = {
        "credential_id": credential_id,
        "profile": profile,
        "common_name": common_name,
        "dns_names": list(dns_names),
        "ip_addresses": list(ip_addresses),
        "algorithm": algorithm,
        "lifetime_days": lifetime_days,
    }
    issued = client_from(ctx).request("POST", "/v1/certificates", json=body)
    emit(issued if as_json else issued["certificate"], as_json, fields=CERT_FIELDS)


@cert.command("list")
@click.option("--device", "device_id")
@click.option("--status", type=click.Choice(["valid", "revoked"]))
@click.option("--expiring-within", help="Like 30d, 12h.")
@paging_options
@json_option
@click.pass_context
def cert_list(
    ctx: click.Context,
    device_id: str | None,
    status: str | None,
    expiring_within: str | None,
    limit: int,
    cursor: str | None,
    fetch_all: bool,
    as_json: bool,
) -> None:
    """Certificates this CA issued."""
    params = [
        (k, v)
        for k, v in (
            ("device_id", device_id),
            ("status", status),
            ("expiring_within", expiring_within),
        )
        if v is not None
    ]
    page = fetch_pages(
        client_from(ctx),
        "/v1/certificates",
        params,
        limit=limit,
        cursor=cursor,
        fetch_all=fetch_all,
    )
    emit(page, as_json, columns=CERT_COLUMNS)


@cert.command("show")
@click.argument("serial")
@click.option("--pem", is_flag=True, help="Print the certificate itself.")
@json_option
@click.pass_context
def cert_show(ctx: click.Context, serial: str, pem: bool, as_json: bool) -> None:
    found = client_from(ctx).request("GET", f"/v1/certificates/{quote(serial, safe='')}")
    if pem:
        click.echo(found["certificate_pem"], nl=False)
        return
    emit(found, as_json, fields=CERT_FIELDS)


@cert.command("revoke")
@click.argument("serial")
@click.option(
    "--reason",
    default="unspecified",
    show_default=True,
    type=click.Choice(
        [
            "unspecified",
            "keyCompromise",
            "cACompromise",
            "affiliationChanged",
            "superseded",
            "cessationOfOperation",
            "certificateHold",
            "privilegeWithdrawn",
        ]
    ),
)
@json_option
@click.pass_context
def cert_revoke(ctx: click.Context, serial: str, reason: str, as_json: bool) -> None:
    """Revoke now: the CRL and OCSP say so before this returns."""
    revoked = client_from(ctx).request(
        "POST", f"/v1/certificates/{quote(serial, safe='')}/revoke", json={"reason": reason}
    )
    emit(revoked, as_json, fields=CERT_FIELDS)


@cert.command("inventory")
@click.option("--expiring-within", help="Like 30d.")
@json_option
@click.pass_context
def cert_inventory(ctx: click.Context, expiring_within: str | None, as_json: bool) -> None:
    """Every certificate, CA and CRL fleetgate issued or holds, soonest end first."""
    params = [("expiring_within", expiring_within)] if expiring_within else []
    emit(
        client_from(ctx).request("GET", "/v1/inventory", params=params),
        as_json,
        columns=INVENTORY_COLUMNS,
    )
