"""``fleetgate connect``: local plain connections forwarded over verified TLS.

The stunnel client role on an operator's PC. Only the options live here; the relay
(``connect_relay``) loads when the command runs, so other commands and ``--help`` do not pay
for pydantic, cryptography and uvloop.
"""

from __future__ import annotations

import click


@click.command("connect")
@click.option("--listen", required=True, help="Local HOST:PORT for plain connections.")
@click.option("--to", "to", required=True, help="Destination HOST:PORT speaking TLS.")
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
def connect_command(
    listen: str,
    to: str,
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
