"""Opening a data directory's store and services from the CLI, without serving."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fleetgate.config import Config
    from fleetgate.datadir import DataDir
    from fleetgate.sealing import Keyring
    from fleetgate.services.bundle import Services


@dataclass(frozen=True)
class Local:
    data: DataDir
    config: Config
    keyring: Keyring
    services: Services
    env: dict[str, str]


@asynccontextmanager
async def open_local(data_dir: Path, config_path: Path | None) -> AsyncIterator[Local]:
    """The data directory's store, migrated, with its keyring and every service."""
    # Imported here so API-only commands start without loading the server's modules.
    from fleetgate.clock import SystemClock
    from fleetgate.config import load_config
    from fleetgate.datadir import prepare
    from fleetgate.runtime import open_keyring, public_url
    from fleetgate.services.bundle import Services
    from fleetgate.store import open_database
    from fleetgate.store.migrations import migrate

    os.umask(0o077)  # the database and keys are nobody else's business, as under serve
    env = dict(os.environ)
    data = prepare(data_dir, config_path)
    config = load_config(data.config_path, env)
    clock = SystemClock()
    db = await open_database(config.store, data.path)
    try:
        await migrate(db, clock)
        keyring = await open_keyring(data, config, db, env)
        services = Services.build(
            db,
            keyring,
            clock,
            pki=config.pki,
            public_url=public_url(config),
            sessions=config.sessions,
        )
        yield Local(data, config, keyring, services, env)
    finally:
        await db.close()
