# The tunnel core (_tunnel.c): its interface, for the type checker.
import socket
import ssl
from collections.abc import Callable

class Core:
    count: int
    accepted: int
    adopted: int
    resting: int
    trims: int
    trim_due: bool
    turns_posted: int
    def __init__(
        self,
        context: ssl.SSLContext | None,
        ctx: int,
        server_name: str | None,
        name_is_ip: bool,
        identity: object,
        resume: bool,
        connect_timeout: float,
        idle_timeout: float,
        on_end: Callable[[str, str, int, str, str, int, int], None],
        clock: Callable[[], float] | None = None,
        turn_chunks: int = 16,
    ) -> None: ...
    def set_destination(self, ips: list[str], port: int, /) -> None: ...
    def listen(self, sock: socket.socket, /) -> None: ...
    def fileno(self) -> int: ...
    def run(self) -> bool: ...
    def serve(self, seconds: float, /) -> None: ...
    def expire(self) -> None: ...
    def close_all(self, outcome: str, /) -> None: ...
    def adopt(
        self,
        device_fd: int,
        upstream_fd: int,
        owner: object,
        ssl: int,
        source: str,
        idle_timeout: float,
        on_end: Callable[[str, str, int, str, str, int, int], None],
        on_read: Callable[[int], bool] | None,
        device_ssl: int = 0,
        /,
    ) -> int: ...
    def cut(self, key: int, outcome: str, /) -> bool: ...

def bind(*addresses: int) -> None: ...
def allow_freeing_buffers(flag: bool, /) -> None: ...
