"""A throwaway PostgreSQL server for tests: initdb in a temp dir, pg_ctl start, pg_ctl stop.

The suite never relies on a system PostgreSQL service. It finds Debian's binaries (the highest
version under ``/usr/lib/postgresql/*/bin``, else ``PATH``), creates a cluster owned by the
``postgres`` system user when running as root (the server refuses to run as root), listens on a
free TCP port on 127.0.0.1 only, and hands out one fresh database per test.

A missing PostgreSQL is a failure, not a skip: :class:`PostgresNotInstalled` says how to fix it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

SUPERUSER = "fleetgate"
SERVICE_USER = "postgres"
START_TIMEOUT_S = 60
START_ATTEMPTS = 3

INSTALL_HINT = (
    "PostgreSQL server binaries (initdb, pg_ctl) were not found in /usr/lib/postgresql/*/bin "
    "or on PATH. The store tests run every contract against a real PostgreSQL and a missing "
    "peer is a failure, not a skip: install Debian's server package "
    "(`apt-get install postgresql`, which provides /usr/lib/postgresql/<version>/bin), "
    "or deselect the PostgreSQL half with `-m 'not postgres'` knowingly."
)


class PostgresNotInstalled(RuntimeError):
    """initdb/pg_ctl are missing (or cannot be run as a non-root user)."""


class PostgresCommandFailed(RuntimeError):
    """initdb, pg_ctl or psql failed (the message carries their output and the server log)."""


def _version_key(bindir: Path) -> tuple[int, ...]:
    # /usr/lib/postgresql/<version>/bin: compare "15" and "9.6" numerically, not as text.
    return tuple(int(part) for part in re.findall(r"\d+", bindir.parent.name)) or (0,)


def find_bindir() -> Path:
    """The directory holding ``initdb`` and ``pg_ctl`` (the highest Debian version first)."""
    candidates = [
        p.parent
        for p in Path("/usr/lib/postgresql").glob("*/bin/initdb")
        if (p.parent / "pg_ctl").exists()
    ]
    if candidates:
        return max(candidates, key=_version_key)
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl and Path(initdb).parent == Path(pg_ctl).parent:
        return Path(initdb).parent
    raise PostgresNotInstalled(INSTALL_HINT)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PostgresServer:
    """A running throwaway cluster; :meth:`start` builds one, :meth:`stop` removes it."""

    bindir: Path
    root: Path
    port: int
    run_as: str | None  # system user the server runs as (None: the current user)
    _counter: Iterator[int] = field(default_factory=lambda: itertools.count(1), repr=False)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_file(self) -> Path:
        return self.root / "server.log"

    @property
    def dsn(self) -> str:
        """The maintenance database (``postgres``), as the trusted superuser."""
        return self.dsn_for("postgres")

    def dsn_for(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    # -- lifecycle -------------------------------------------------------------------------------

    @classmethod
    def start(cls) -> PostgresServer:
        bindir = find_bindir()
        run_as: str | None = None
        if os.geteuid() == 0:
            try:
                pwd.getpwnam(SERVICE_USER)
            except KeyError:
                raise PostgresNotInstalled(
                    f"running as root but there is no {SERVICE_USER!r} system user to run the "
                    f"server as (PostgreSQL refuses to run as root). {INSTALL_HINT}"
                ) from None
            if shutil.which("runuser") is None:
                raise PostgresNotInstalled("running as root but `runuser` (util-linux) is missing")
            run_as = SERVICE_USER
        root = Path(tempfile.mkdtemp(prefix="fleetgate-pg-"))
        server = cls(bindir=bindir, root=root, port=0, run_as=run_as)
        try:
            if run_as is not None:
                account = pwd.getpwnam(run_as)
                os.chown(root, account.pw_uid, account.pw_gid)
            server._initdb()
            server._start_on_a_free_port()
        except BaseException:
            server._remove()
            raise
        return server

    def stop(self) -> None:
        """Stop the server (immediate mode: nothing to keep) and delete its directory."""
        try:
            if (self.data_dir / "postmaster.pid").exists():
                result = self._run(
                    [
                        str(self.bindir / "pg_ctl"),
                        "-D",
                        str(self.data_dir),
                        "-m",
                        "immediate",
                        "-w",
                        "stop",
                    ],
                    check=False,
                )
                if result.returncode != 0:
                    self._kill_postmaster()
        finally:
            self._remove()

    def __enter__(self) -> PostgresServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- databases -------------------------------------------------------------------------------

    def _next_name(self) -> str:
        return f"test_{next(self._counter)}"

    async def create_database(self, options: str = "") -> str:
        """``CREATE DATABASE test_N [options]``; the new database's DSN.

        ``options`` is trusted SQL from the test itself, e.g. ``TEMPLATE template0
        LOCALE_PROVIDER icu ICU_LOCALE 'en-US'`` for a database with another collation.
        """
        name = self._next_name()
        conn = await asyncpg.connect(self.dsn, timeout=10)
        try:
            await conn.execute(f'CREATE DATABASE "{name}" {options}'.rstrip())
        finally:
            await conn.close()
        return self.dsn_for(name)

    def create_database_sync(self) -> str:
        """:meth:`create_database` for callers without an event loop (through ``psql``)."""
        name = self._next_name()
        psql = self.bindir / "psql"
        self._run(
            [
                str(psql if psql.exists() else "psql"),
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                self.dsn,
                "-c",
                f'CREATE DATABASE "{name}"',
            ]
        )
        return self.dsn_for(name)

    async def drop_database(self, dsn: str) -> None:
        name = dsn.rsplit("/", 1)[-1]
        conn = await asyncpg.connect(self.dsn, timeout=10)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    # -- internals -------------------------------------------------------------------------------

    def _command(self, argv: Sequence[str]) -> list[str]:
        if self.run_as is None:
            return list(argv)
        return ["runuser", "-u", self.run_as, "--", *argv]

    def _run(self, argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        env.pop("PGDATA", None)
        result = subprocess.run(
            self._command(argv),
            cwd=self.root,  # readable by the service user, unlike the caller's working directory
            env=env,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT_S + 30,
            check=False,
        )
        if check and result.returncode != 0:
            raise PostgresCommandFailed(
                f"{' '.join(argv)} exited with {result.returncode}\n"
                f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}\n{self._log_tail()}"
            )
        return result

    def _initdb(self) -> None:
        self._run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.data_dir),
                "--auth=trust",
                "-U",
                SUPERUSER,
                "--encoding=UTF8",
                # Byte-order collation, as SQLite and Python sort: the contract tests compare
                # orderings across backends and must not depend on the host's locale.
                "--locale=C",
                "--no-sync",
            ]
        )

    def _pg_ctl_start(self) -> None:
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        self._run(
            [
                str(self.bindir / "pg_ctl"),
                "-D",
                str(self.data_dir),
                "-l",
                str(self.log_file),
                "-o",
                options,
                "-w",
                "-t",
                str(START_TIMEOUT_S),
                "start",
            ]
        )

    def _start_on_a_free_port(self) -> None:
        for attempt in range(1, START_ATTEMPTS + 1):
            self.port = free_port()
            try:
                self._pg_ctl_start()
            except PostgresCommandFailed:
                # Another process may take the port between our probe and the server's bind.
                if attempt == START_ATTEMPTS:
                    raise
            else:
                return

    def _log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return "(no server log)"
        return "server log (tail):\n" + "\n".join(text.splitlines()[-lines:])

    def _kill_postmaster(self) -> None:
        """Last resort when pg_ctl cannot stop it: the pid this cluster's postmaster recorded."""
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int((self.data_dir / "postmaster.pid").read_text().splitlines()[0])
            os.kill(pid, signal.SIGQUIT)

    def _remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    """Start a throwaway server for the ``with`` block; stopped and deleted afterwards."""
    server = PostgresServer.start()
    with server:
        yield server
