"""A listener counts each connection once, whichever stage it ends in: real sockets on
127.0.0.1, the listener with a handler of the test's own."""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any, cast

from fleetgate.clock import FakeClock
from fleetgate.config.schema import ListenerConfig
from fleetgate.dataplane.datapath import DataPath
from fleetgate.dataplane.endpoint import PlainEndpoint
from fleetgate.dataplane.listener import Conn, Relay, StreamListener
from fleetgate.dataplane.upstream import Upstream
from fleetgate.metrics import Metrics

TIMEOUT_S = 10.0


async def test_a_relay_that_ends_as_it_starts_is_counted_once() -> None:
    """A device that resets while the destination is dialled: its relay ends as it starts,
    before its set-up task's end is heard of. Both must not count its end."""
    loop = asyncio.get_running_loop()

    async def destination(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the relay ends
        writer.close()

    dialled = await asyncio.start_server(destination, "127.0.0.1", 0)
    destination_port = dialled.sockets[0].getsockname()[1]
    set_up: list[tuple[Conn, asyncio.Task[Any]]] = []
    second_dialling = asyncio.Event()

    async def handler(conn: Conn) -> Relay:
        task = asyncio.current_task()
        assert task is not None
        set_up.append((conn, task))
        second = len(set_up) == 2
        _, upstream = await loop.create_connection(PlainEndpoint, "127.0.0.1", destination_port)
        if second:
            second_dialling.set()
            await conn.endpoint.closed  # the device gave up meanwhile
        return Relay(upstream)

    metrics = Metrics()
    unused = cast(Any, None)  # (the handler resolves nothing through the data path)
    path = DataPath(unused, Upstream(FakeClock()), {}, FakeClock(), metrics, unused)
    config = ListenerConfig.model_validate({"protocol": "tcp", "bind": "127.0.0.1:0"})
    listener = StreamListener("t", config, path, handler, sharing=None)
    await listener.start()
    port = listener.bound_addresses[0][1]

    held = await loop.run_in_executor(None, socket.create_connection, ("127.0.0.1", port))
    gone = await loop.run_in_executor(None, socket.create_connection, ("127.0.0.1", port))
    async with asyncio.timeout(TIMEOUT_S):
        await second_dialling.wait()
    gone.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    gone.close()  # a reset
    async with asyncio.timeout(TIMEOUT_S):
        await set_up[1][1]  # its task's end, and the relay's before it, have been heard of

    assert listener.active == 1  # the held one, relayed
    assert listener.load.connections == 1
    assert dict(listener.load.per_source) == {"127.0.0.1": 1}
    active = metrics.registry.get_sample_value(
        "fleetgate_listener_active_connections", {"listener": "t"}
    )
    assert active == 1.0

    held.close()
    await listener.stop_accepting()
    async with asyncio.timeout(TIMEOUT_S):
        await listener.drain(TIMEOUT_S)
    assert (listener.active, listener.load.connections, dict(listener.load.per_source)) == (
        0,
        0,
        {},
    )
    dialled.close()
    async with asyncio.timeout(TIMEOUT_S):
        await dialled.wait_closed()
