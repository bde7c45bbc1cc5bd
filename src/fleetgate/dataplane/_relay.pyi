# The compiled relay (_relay.c): its interface, for the type checker.
import asyncio

from fleetgate.dataplane.endpoint import Endpoint

class Pipe:
    received: int
    last: float
    endpoint: Endpoint
    def __init__(
        self,
        endpoint: Endpoint,
        transport: asyncio.BaseTransport,
        ssl: int,
        clock: object,
        fd: int = -1,
        /,
    ) -> None: ...
    def get_buffer(self, sizehint: int, /) -> memoryview: ...
    def buffer_updated(self, nbytes: int, /) -> None: ...
    def data_received(self, data: bytes, /) -> None: ...
    def eof_received(self) -> bool | None: ...
    def connection_made(self, transport: asyncio.BaseTransport, /) -> None: ...
    def connection_lost(self, exc: Exception | None, /) -> None: ...
    def pause_writing(self) -> None: ...
    def resume_writing(self) -> None: ...
    def join(self, other: Pipe, /) -> None: ...
    def detach(self) -> None: ...

def use_buffer(buffer: memoryview, /) -> None: ...
def bind(
    ssl_read_ex: int,
    ssl_write_ex: int,
    ssl_get_error: int,
    ssl_get_rbio: int,
    ssl_get_wbio: int,
    bio_write: int,
    bio_read: int,
    bio_ctrl_pending: int,
    ssl_pending: int,
    ssl_get_shutdown: int,
    err_clear_error: int,
    /,
) -> None: ...
