"""What ``fleetgate connect`` runs: local plain connections forwarded over verified TLS.

The stunnel client role on an operator's PC (and the bare relay the benchmarks measure). Where
the tunnel core is built (:mod:`~fleetgate.dataplane.tunnel`), each connection is set up and
relayed in C and Python only logs its end; otherwise the same upstream code and splice the
gateway's listeners use, without a store. Kept apart from the command's options
(``cmd_connect``) because it loads pydantic, cryptography and uvloop, which no other command
needs.
"""

from __future__ import annotations

import asyncio
import gc
import signal
import ssl
from pathlib import Path

import click

from fleetgate import logs
from fleetgate.cli.client import CliFailure
from fleetgate.clock import SystemClock
from fleetgate.config.schema import DestinationConfig, split_host_port
from fleetgate.dataplane import tunnel
from fleetgate.dataplane.endpoint import Endpoint, PlainEndpoint
from fleetgate.dataplane.splice import SpliceResult, Splicing, start_splice
from fleetgate.dataplane.upstream import (
    ClientCertificate,
    Upstream,
    UpstreamError,
    build_context,
)
from fleetgate.errors import ConfigError
from fleetgate.limits import raise_nofile_limit
from fleetgate.logs import get_logger
from fleetgate.sealing import Secret
from fleetgate.tuning import tune_malloc

log = get_logger("fleetgate.connect")


class _Local(PlainEndpoint):
    __slots__ = ("_relay",)

    def __init__(self, relay: _Relay) -> None:
        super().__init__()
        self._relay = relay

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._relay.accepted(self)


class _Relay:
    def __init__(
        self, destination: DestinationConfig, client: ClientCertificate | None, idle_s: float
    ) -> None:
        self.clock = SystemClock()
        self.destination = destination
        self.client = client
        self.idle_s = idle_s
        self.upstream = Upstream(self.clock)
        self.tasks: set[asyncio.Task[None]] = set()  # connections being set up
        self.live: set[Splicing] = set()  # connections relaying

    def accepted(self, local: _Local) -> None:
        task = asyncio.get_running_loop().create_task(self.serve(local))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def serve(self, local: _Local) -> None:
        # (No log context bound per connection: an idle relay holds thousands of them.)
        try:
            remote = await self.upstream.connect("to", self.destination, self.client)
        except UpstreamError as exc:
            log.warning(
                "connect.refused", source=_source(local), reason=exc.cause, detail=exc.detail
            )
            local.abort()
            return
        # From here on callbacks relay; this task ends (see start_splice).
        self.live.add(
            start_splice(local, remote, self.clock, idle_timeout_s=self.idle_s, on_done=self.closed)
        )

    def closed(self, splicing: Splicing, result: SpliceResult) -> None:
        self.live.discard(splicing)
        splicing.destination.close()
        splicing.device.close()
        log.debug(
            "connect.closed",
            source=_source(splicing.device),
            reason=result.reason,
            up_bytes=result.up_bytes,
            down_bytes=result.down_bytes,
        )


def _source(local: Endpoint) -> str:
    peer = local.peer_address()
    return peer[0] if peer else "?"


def _cannot_bind(listen: str, exc: OSError) -> CliFailure:
    return CliFailure(
        f"--listen: cannot bind {listen}: {exc.strerror or exc}", ConfigError.kind.exit_code
    )


async def _until_stopped() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def _run(listen: str, relay: _Relay) -> None:
    host, port = split_host_port(listen)
    loop = asyncio.get_running_loop()
    try:
        server = await loop.create_server(
            lambda: _Local(relay), host or None, port, reuse_address=True, backlog=4096
        )
    except OSError as exc:
        raise _cannot_bind(listen, exc) from None
    log.info("connect.listening", listen=listen, to=relay.destination.address, core="python")
    await _until_stopped()
    server.close()
    for task in list(relay.tasks):
        task.cancel()
    for splicing in list(relay.live):
        splicing.finish("shutdown")


def _log_end(ended: tunnel.Ended) -> None:
    if ended.refused:
        log.warning("connect.refused", source=ended.source, reason=ended.cause, detail=ended.detail)
    else:
        log.debug(
            "connect.closed",
            source=ended.source,
            reason=ended.outcome,
            cause=ended.cause or None,
            up_bytes=ended.up_bytes,
            down_bytes=ended.down_bytes,
        )


def _serve_tunnel(
    listen: str, destination: DestinationConfig, client: ClientCertificate | None, idle_s: float
) -> None:
    try:
        sockets = tunnel.listening_sockets(listen)
    except OSError as exc:
        raise _cannot_bind(listen, exc) from None
    relay = tunnel.Tunnel(
        destination, client, SystemClock(), idle_timeout_s=idle_s, on_end=_log_end
    )
    for sock in sockets:
        relay.listen(sock)
    try:
        relay.resolve()
    except OSError as exc:
        raise CliFailure(f"--to: {exc.strerror or exc}", ConfigError.kind.exit_code) from None
    stop: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda number, _frame: stop.append(number))
    log.info("connect.listening", listen=listen, to=destination.address, core="c")
    # Everything loaded so far lives as long as the process: the collector need not walk it
    # again each time the objects of ended connections set it off.
    gc.freeze()
    relay.serve_until(lambda: bool(stop))
    relay.close()


def run_connect(
    *,
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
    """Check the options, then relay until SIGTERM or SIGINT."""
    if (cert is None) != (key is None):
        raise click.UsageError("--cert and --key go together")
    logs.configure("console", "info")
    try:
        destination = DestinationConfig(
            address=to,
            server_name=server_name,
            ca_file=cafile,
            pin_sha256=pins,
            min_tls=min_tls,
            session_resumption=not no_resume,
        )
        split_host_port(listen)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    client = None
    if cert is not None and key is not None:
        client = ClientCertificate("cli", Path(cert).read_bytes(), Secret(Path(key).read_bytes()))
    try:  # fail now, not at each connection: the relay builds this context on its first one
        build_context(destination, client)
    except (ssl.SSLError, OSError, ValueError) as exc:
        files = "--cafile, --cert and --key" if client is not None else "--cafile"
        raise CliFailure(
            f"{files}: cannot be used for TLS: {exc}", ConfigError.kind.exit_code
        ) from None
    # No connection limit here, so nothing to compare against: take what the system allows.
    raise_nofile_limit()
    tune_malloc()
    if tunnel.AVAILABLE:
        _serve_tunnel(listen, destination, client, idle_timeout)
        return
    import uvloop

    uvloop.run(_run(listen, _Relay(destination, client, idle_timeout)))
