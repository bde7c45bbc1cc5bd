"""``fleetgate connect``: local plain connections forwarded over verified TLS.

The stunnel client role on an operator's PC. With ``--session`` the destination and the CA come
from the API (a tls remote access session), so nothing is copied by hand. Only the options live
here; the relay (``connect_relay``) loads when the command runs, so other commands and
``--help`` do not pay for pydantic, cryptography and uvloop.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from urllib.parse import quote

import click

from fleetgate.cli.client import CliFailure
from fleetgate.cli.common import client_from


@click.command("connect")
@click.option("--listen", required=True, help="Local HOST:PORT for plain connections.")
@click.option("--to", "to", help="Destination HOST:PORT speaking TLS.")
@click.option(
    "--session",
    "session_id",
    help="A tls remote access session: its public port and CA, fetched from the API.",
)
@click.option(
    "--cafile",
    type=click.Path(exists=True, dir_okay=False),
    help="Trusted CAs (PEM); default: system roots.",
)
@click.option("--server-name", help="Name to verify and send as SNI; default: the host of --to.")
@click.option(
    "--cert", type=click.Path(exists=True, dir_okay=False), help="Client certificate chain (PEM)."
)
@click.option(
    "--key", type=click.Path(exists=True, dir_okay=False), help="Client private key (PEM)."
)
@click.option("--pin", "pins", multiple=True, help="base64 SHA-256 of an SPKI in the chain.")
@click.option("--min-tls", type=click.Choice(["1.2", "1.3"]), default="1.2", show_default=True)
@click.option("--no-resume", is_flag=True, help="Full handshake for every connection.")
@click.option("--idle-timeout", type=float, default=3600.0, show_default=True, help="Seconds.")
@click.pass_context
def connect_command(
    ctx: click.Context,
    listen: str,
    to: str | None,
    session_id: str | None,
    cafile: str | None,
    server_name: str | None,
    cert: str | None,
    key: str | None,
    pins: tuple[str, ...],
    min_tls: str,
    no_resume: bool,
    idle_timeout: float,
) -> None:
    """Forward local plain TCP connections to TO over verified TLS (stunnel's client role)."""
    from fleetgate.cli.connect_relay import run_connect

    with tempfile.TemporaryDirectory(prefix="fleetgate-connect-") as scratch:
        if session_id is not None:
            if to is not None:
                raise click.UsageError("--session names the destination: drop --to")
            to, session_ca, session_client = _from_session(ctx, session_id, Path(scratch))
            cafile = cafile or session_ca
            if session_client is not None and cert is None:
                cert, key = session_client
        elif to is None:
            raise click.UsageError("say where to: --to HOST:PORT, or --session ID")
        run_connect(
            listen=listen,
            to=to,
            cafile=cafile,
            server_name=server_name,
            cert=cert,
            key=key,
            pins=pins,
            min_tls=min_tls,
            no_resume=no_resume,
            idle_timeout=idle_timeout,
        )


def _from_session(
    ctx: click.Context, session_id: str, scratch: Path
) -> tuple[str, str, tuple[str, str] | None]:
    """The session's public HOST:PORT, its CA and (mtls) its client certificate and key, the
    files in ``scratch`` readable by us alone."""
    client = client_from(ctx)
    path = f"/v1/sessions/{quote(session_id, safe='')}"
    found = client.request("GET", path)
    if found["state"] != "open":
        raise CliFailure(f"session {session_id} has ended ({found['end_reason']})", 1)
    where = f"{found['public_host']}:{found['public_port']}"
    if not found["tls"]:
        raise CliFailure(
            f"session {session_id} is plain (no TLS to speak): connect straight to {where}", 2
        )
    ca = _private(scratch / "session-ca.pem", found["ca_pem"])
    if not found["mtls"]:
        return where, ca, None
    credential = client.request("POST", f"{path}/client-credential")
    chain = _private(scratch / "session-client.pem", credential["chain_pem"])
    return where, ca, (chain, _private(scratch / "session-client.key", credential["key_pem"]))


def _private(path: Path, text: str) -> str:
    path.touch(mode=0o600)
    path.write_text(text, encoding="ascii")
    return str(path)
