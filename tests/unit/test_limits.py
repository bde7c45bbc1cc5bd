"""The open-file limit: raised to the hard limit at start, logged, and compared with what the
listeners could need.

The function changes its process's limit, so each case runs in a child Python that first sets
the limit a badly configured host would give it (a low soft limit, or a low hard one too).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from fleetgate.config.schema import ListenerConfig
from fleetgate.limits import RESERVED_FDS, fds_needed

LOW_SOFT = 64

_CHILD = textwrap.dedent(
    """
    import json, resource, sys
    soft, hard = int(sys.argv[1]), int(sys.argv[2])
    needed = int(sys.argv[3]) if len(sys.argv) > 3 else None
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    from fleetgate import logs
    from fleetgate.limits import raise_nofile_limit

    logs.configure("json", "info")
    returned = raise_nofile_limit(needed)
    print(json.dumps({
        "in_force": resource.getrlimit(resource.RLIMIT_NOFILE),
        "returned": [returned.soft, returned.hard],
    }))
    """
)


def _run(soft: int, hard: int, needed: int | None = None) -> tuple[dict[str, Any], list[Any]]:
    """The child's limits afterwards, and the events it logged."""
    args = [str(soft), str(hard)] + ([str(needed)] if needed is not None else [])
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    events = [json.loads(line) for line in done.stderr.splitlines()]
    return json.loads(done.stdout), events


def _hard_limit() -> int:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard <= LOW_SOFT:
        pytest.skip(f"the hard limit here ({hard}) leaves no room below it")
    return hard


def test_the_soft_limit_is_raised_to_the_hard_limit_and_logged_once() -> None:
    hard = _hard_limit()
    if hard == resource.RLIM_INFINITY:
        pytest.skip("an unlimited hard limit cannot be a soft limit")
    result, events = _run(LOW_SOFT, hard)
    assert result["in_force"] == [hard, hard]
    assert result["returned"] == [hard, hard]
    [logged] = [e for e in events if e["event"] == "limits.nofile"]
    assert logged["level"] == "info"
    assert (logged["soft"], logged["hard"]) == (hard, hard)
    assert not [e for e in events if e["level"] == "warning"]


def test_a_hard_limit_below_what_the_listeners_need_is_warned_about() -> None:
    hard = min(_hard_limit(), 2 * LOW_SOFT)
    result, events = _run(LOW_SOFT, hard, needed=20_256)
    assert result["in_force"] == [hard, hard]
    [low] = [e for e in events if e["event"] == "limits.nofile_low"]
    assert low["level"] == "warning"
    assert (low["soft"], low["needed"]) == (hard, 20_256)
    assert "max_connections" in low["fix"]


def test_enough_descriptors_is_not_warned_about() -> None:
    hard = min(_hard_limit(), 2 * LOW_SOFT)
    _, events = _run(LOW_SOFT, hard, needed=hard)
    assert [e["event"] for e in events] == ["limits.nofile"]


def test_stream_connections_count_twice_and_udp_datagrams_once() -> None:
    listeners = [
        ListenerConfig(protocol="mqtt", bind="127.0.0.1:1883", max_connections=1000),
        ListenerConfig(protocol="tcp", bind="127.0.0.1:5020", max_connections=10),
        ListenerConfig(protocol="udp", bind="127.0.0.1:5683", max_in_flight=300),
    ]
    assert fds_needed(listeners) == RESERVED_FDS + 2 * 1000 + 2 * 10 + 300
    assert fds_needed([]) == RESERVED_FDS
