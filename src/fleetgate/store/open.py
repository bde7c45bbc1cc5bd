"""Choosing and opening a backend from configuration."""

from __future__ import annotations

from pathlib import Path

from fleetgate.config.schema import StoreConfig
from fleetgate.store.database import Database


async def open_database(config: StoreConfig, data_dir: Path) -> Database:
    if config.backend == "postgresql":
        from fleetgate.store.postgres import PostgresDatabase

        assert config.postgresql_dsn is not None  # the schema requires it
        return await PostgresDatabase.open(
            config.postgresql_dsn.reveal_text(),
            pool_max=config.postgresql_pool_max,
            timeout_s=config.connect_timeout_s,
        )
    from fleetgate.store.sqlite import SqliteDatabase

    return await SqliteDatabase.open(data_dir / config.sqlite_path)
