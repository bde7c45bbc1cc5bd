"""The CLI starts without the gateway's heavy dependencies; commands load what they use.

Each case runs in a fresh interpreter: the test process has imported everything already.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import pytest

# What `fleetgate --help` used to pay for on every run (about 0.6 s of a 0.65 s start).
HEAVY = ("pydantic", "cryptography", "uvloop", "httpx", "fastapi", "uvicorn", "asyncpg", "asyncio")

_CHILD = textwrap.dedent(
    """
    import contextlib, io, json, sys
    from fleetgate.cli.main import cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            cli.main(sys.argv[1:], prog_name="fleetgate", standalone_mode=False)
        except SystemExit:
            pass
    heavy = json.loads(sys.stdin.read())
    print(json.dumps({"help": out.getvalue(), "loaded": [m for m in heavy if m in sys.modules]}))
    """
)


def _cli(*args: str) -> tuple[str, list[str]]:
    """What ``fleetgate ARGS`` printed, and which heavy modules it had loaded by then."""
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, *args],
        input=json.dumps(HEAVY),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result = json.loads(done.stdout)
    return result["help"], result["loaded"]


@pytest.mark.parametrize(
    "args",
    [("--help",), ("--version",), ("device", "list", "--help"), ("connect", "--help")],
)
def test_help_loads_no_heavy_module(args: tuple[str, ...]) -> None:
    _, loaded = _cli(*args)
    assert loaded == []


def test_the_root_help_lists_every_command() -> None:
    text, _ = _cli("--help")
    listed = re.findall(r"^  ([a-z]+)  ", text.partition("Commands:")[2], re.MULTILINE)
    assert listed == [
        "audit", "ca", "cert", "config", "connect", "credential", "device", "group", "keys",
        "serve", "session", "token",
    ]  # fmt: skip
    assert re.search(r"^  connect +Forward local plain TCP connections", text, re.MULTILINE)


def test_connect_help_shows_all_its_options() -> None:
    text, _ = _cli("connect", "--help")
    for option in (
        "--listen",
        "--to",
        "--session",
        "--cafile",
        "--server-name",
        "--cert",
        "--key",
        "--pin",
        "--min-tls",
        "--no-resume",
        "--idle-timeout",
    ):
        assert option in text
