"""The open-file limit (RLIMIT_NOFILE), raised once at each process's start.

Every relayed stream connection holds two descriptors, the device's socket and the upstream
one, so a listener with ``max_connections = 10000`` can need 20,000 in each process that serves
it. The soft limit is often 1024 (kept low for programs that still use ``select()``, which
cannot watch descriptors above 1023); the hard limit is what the administrator allows.
fleetgate waits on sockets with epoll (uvloop), never ``select()``, so it takes the hard limit
instead of failing with EMFILE ("too many open files") after about 500 relayed connections.
"""

from __future__ import annotations

import resource
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fleetgate.logs import get_logger

if TYPE_CHECKING:
    from fleetgate.config.schema import ListenerConfig

log = get_logger("fleetgate.limits")
# Descriptors a process holds besides relayed connections: standard streams, the store (SQLite
# files or a PostgreSQL pool of up to store.postgresql_pool_max), listening sockets, the API's
# clients, workers' pipes. An idle gateway with SQLite and one listener holds about 20.
RESERVED_FDS = 256


@dataclass(frozen=True)
class NofileLimit:
    soft: int
    hard: int


def fds_needed(listeners: Iterable[ListenerConfig]) -> int:
    """What the listeners may hold open at once in one process: two per stream connection
    (device and upstream), one per UDP datagram being forwarded, plus :data:`RESERVED_FDS`."""
    needed = RESERVED_FDS
    for listener in listeners:
        if listener.protocol == "udp":
            needed += listener.max_in_flight
        else:
            needed += 2 * listener.max_connections
    return needed


def raise_nofile_limit(needed: int | None = None) -> NofileLimit:
    """Raise the soft limit to the hard limit, log the result, and warn when it is below
    ``needed`` (see :func:`fds_needed`); the limit in force afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            # macOS reports an unlimited hard limit that setrlimit then refuses.
            log.warning("limits.nofile_unchanged", soft=soft, hard=hard, detail=str(exc))
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = NofileLimit(soft, hard)  # RLIM_INFINITY reads as -1, as in Python's resource
    log.info("limits.nofile", soft=limit.soft, hard=limit.hard)
    if needed is not None and soft != resource.RLIM_INFINITY and soft < needed:
        log.warning(
            "limits.nofile_low",
            soft=limit.soft,
            needed=needed,
            detail="the listeners' max_connections could need more descriptors than this "
            "process may open; connections beyond the limit fail to be accepted or dialled",
            fix="raise the hard limit (systemd LimitNOFILE=, docker --ulimit nofile=, "
            "/etc/security/limits.conf) or lower max_connections",
        )
    return limit
