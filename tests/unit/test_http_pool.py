"""The http listener's kept-alive connections to a destination (``http_upstream.KeptAlive``):
a device's next request reuses its own connection, and what nobody comes back for does not
stay. A real TLS server on 127.0.0.1 answers one request per connection at a time and ends a
connection when the test says so; the gateway's side is its own upstream code."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import h11
import pytest

from fleetgate.clock import FakeClock
from fleetgate.config.schema import DestinationConfig
from fleetgate.dataplane import http_upstream
from fleetgate.dataplane.http_upstream import KeptAlive, _Pooled, next_event
from fleetgate.dataplane.upstream import Upstream
from support.certs import TestCA
from support.tls_pair import server_context

TIMEOUT_S = 10.0


@dataclass
class Site:
    destination: DestinationConfig
    upstream: Upstream
    # The server's side of each connection, in the order they came: set one to end it.
    endings: list[asyncio.Event] = field(default_factory=list)


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    ca = TestCA.create("pool root")
    cafile = ca.write_bundle(tmp_path / "ca.pem")
    context = server_context(ca.issue_server().write(tmp_path, "server"))
    endings: list[asyncio.Event] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ending = asyncio.Event()
        endings.append(ending)
        with contextlib.suppress(ConnectionError):
            while True:
                read = asyncio.ensure_future(reader.readuntil(b"\r\n\r\n"))
                ended = asyncio.ensure_future(ending.wait())
                await asyncio.wait((read, ended), return_when=asyncio.FIRST_COMPLETED)
                if ending.is_set():
                    read.cancel()
                    break
                ended.cancel()
                read.result()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    destination = DestinationConfig(
        address=f"127.0.0.1:{port}", server_name="localhost", ca_file=str(cafile)
    )
    yield Site(destination, Upstream(FakeClock()), endings)
    server.close()
    server.close_clients()
    await server.wait_closed()


async def _exchanged(site: Site, pooled: _Pooled | None = None) -> _Pooled:
    """One request and its whole response, on ``pooled`` or a new connection."""
    if pooled is None:
        endpoint = await site.upstream.connect("to", site.destination, None)
        pooled = _Pooled(endpoint, h11.Connection(h11.CLIENT))
    http = pooled.http
    request = h11.Request(method="GET", target="/", headers=[("Host", "localhost")])
    pooled.endpoint.write((http.send(request) or b"") + (http.send(h11.EndOfMessage()) or b""))
    async with asyncio.timeout(TIMEOUT_S):
        while not isinstance(await next_event(http, pooled.endpoint), h11.EndOfMessage):
            pass
    return pooled


async def test_a_connection_the_server_ends_while_idle_is_closed_at_once(site: Site) -> None:
    pool = KeptAlive(FakeClock())
    pooled = await _exchanged(site)
    pool.give_back(("device-1",), pooled, reusable=True)
    site.endings[0].set()  # the server's keep-alive timeout, say
    await asyncio.wait_for(pooled.endpoint.closed, TIMEOUT_S)  # no request needed for that
    assert pool.keys == 1
    pool.sweep()
    assert pool.keys == 0  # and its device's pool is forgotten
    assert pool.take(("device-1",)) is None
    pool.close()


async def test_what_nobody_came_back_for_is_closed_by_the_sweep(site: Site) -> None:
    clock = FakeClock()
    pool = KeptAlive(clock)
    gone = await _exchanged(site)
    pool.give_back(("gone",), gone, reusable=True)
    clock.advance(http_upstream.IDLE_KEEP_S / 2)
    back = await _exchanged(site)
    pool.give_back(("back",), back, reusable=True)
    clock.advance(http_upstream.IDLE_KEEP_S / 2 + 1)  # "gone" idle for longer than kept
    pool.sweep()
    assert pool.keys == 1
    await asyncio.wait_for(gone.endpoint.closed, TIMEOUT_S)
    assert not back.endpoint.is_closed
    reused = pool.take(("back",))
    assert reused is back
    assert reused.endpoint.on_eof is None  # the exchange reads the server's end itself
    assert (await _exchanged(site, reused)) is back  # and it still serves
    pool.give_back(("back",), back, reusable=True)
    pool.close()
    await asyncio.wait_for(back.endpoint.closed, TIMEOUT_S)
    assert pool.keys == 0


async def test_an_exchange_that_did_not_finish_is_not_kept(site: Site) -> None:
    pool = KeptAlive(FakeClock())
    pooled = await _exchanged(site)
    pool.give_back(("device-1",), pooled, reusable=False)
    await asyncio.wait_for(pooled.endpoint.closed, TIMEOUT_S)
    assert pool.keys == 0
