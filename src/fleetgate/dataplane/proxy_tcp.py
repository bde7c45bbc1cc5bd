"""tcp listeners: the source address names the device; bytes are relayed as they are to the
device's destination (over verified TLS, or plain for ``forward_to``), optionally preceded by a
PROXY protocol v2 header."""

from __future__ import annotations

from fleetgate.dataplane.listener import Conn, Relay
from fleetgate.dataplane.proxy_protocol import header_v2
from fleetgate.logs import bind, get_logger

log = get_logger("fleetgate.dataplane")


async def serve_tcp(conn: Conn) -> Relay:
    device = await conn.device()
    conn.identified(device.id)
    with bind(device=device.id):
        route = await conn.path.route(conn.listener, conn.config, device)
        preamble = b""
        if route.destination.proxy_protocol:
            peer = conn.endpoint.peer_address() or (conn.source, 0)
            local = conn.endpoint.local_address() or ("0.0.0.0", 0)  # noqa: S104 - a header value
            preamble = header_v2(peer, local, device_id=device.id, connection_id=conn.id)
        upstream = await conn.path.dial(device, route, preamble=preamble)
        try:
            conn.connected(route.name)
        except BaseException:
            upstream.close()
            raise
        return Relay(upstream, silence_is_refusal=True)
