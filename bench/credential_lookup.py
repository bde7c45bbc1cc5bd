"""How credential lookups scale: resolve a device's credential among 1,000 and 100,000.

    .venv/bin/python bench/credential_lookup.py [--sizes 1000,100000] [--lookups 5000]
        [--backend sqlite|postgresql --dsn postgresql://…]

Fills a fresh store (SQLite in a temp dir by default) with password credentials named
``cred-<n>``, then resolves ``cred-#{serial}`` for random devices the way a route does
(template expansion + one store read), and reports p50/p99 latency, lookups per second and CPU
per lookup for each size, plus the ratio of the largest size to the smallest.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import resource
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from fleetgate.clock import SystemClock
from fleetgate.pki.records import Credential, CredentialKind
from fleetgate.records import Device, DeviceStatus
from fleetgate.sealing import Keyring, MasterKey
from fleetgate.services.bundle import Services
from fleetgate.store import Database
from fleetgate.store.credentials import CredentialRepo
from fleetgate.store.migrations import migrate
from fleetgate.store.postgres import PostgresDatabase
from fleetgate.store.sqlite import SqliteDatabase
from fleetgate.templates import Template

BATCH = 2000


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _fill(db: Database, count: int) -> None:
    now = datetime.now(UTC)
    for start in range(0, count, BATCH):
        async with db.transaction() as tx:
            repo = CredentialRepo(tx)
            for n in range(start, min(start + BATCH, count)):
                await repo.insert(
                    Credential(
                        id=f"cred-{n}",
                        kind=CredentialKind.PASSWORD,
                        description="",
                        device_id=None,
                        public={"username": f"user-{n}"},
                        certificate_serial=None,
                        certificate=None,
                        chain=None,
                        not_after=None,
                        has_secret=False,
                        exported_at=None,
                        created_at=now,
                        updated_at=now,
                        revision=1,
                    )
                )


async def _measure(db: Database, count: int, lookups: int) -> dict[str, float]:
    services = Services.build(db, Keyring([MasterKey.generate()]), SystemClock())
    template = Template.parse("cred-#{serial}")
    rng = random.Random(count)  # noqa: S311 - reproducible load, not cryptography
    now = datetime.now(UTC)
    devices = [
        Device(
            f"d{i}",
            f"d{i}",
            "default",
            DeviceStatus.ENABLED,
            {"serial": str(rng.randrange(count))},
            (),
            now,
            now,
            1,
        )
        for i in range(lookups)
    ]
    for device in devices[:200]:  # warm caches and the connection
        await services.credentials.resolve(device, template, None)
    latencies: list[float] = []
    cpu0, wall0 = _cpu_s(), time.perf_counter()
    for device in devices:
        t0 = time.perf_counter()
        found = await services.credentials.resolve(device, template, None)
        latencies.append(time.perf_counter() - t0)
        if found is None or found.id != f"cred-{device.attributes['serial']}":
            raise RuntimeError(f"wrong credential for {device.attributes}: {found}")
    wall, cpu = time.perf_counter() - wall0, _cpu_s() - cpu0
    latencies.sort()
    return {
        "credentials": count,
        "lookups": lookups,
        "p50_us": round(statistics.median(latencies) * 1e6, 1),
        "p99_us": round(latencies[int(len(latencies) * 0.99)] * 1e6, 1),
        "lookups_per_s": round(lookups / wall),
        "cpu_us_per_lookup": round(cpu / lookups * 1e6, 1),
    }


async def _open(backend: str, dsn: str | None, workdir: Path, count: int) -> Database:
    if backend == "postgresql":
        assert dsn, "--dsn is required for postgresql"
        return await PostgresDatabase.open(dsn, pool_max=4, timeout_s=10)
    return await SqliteDatabase.open(workdir / f"bench-{count}.db")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,100000")
    parser.add_argument("--lookups", type=int, default=5000)
    parser.add_argument("--backend", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--dsn")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for count in (int(s) for s in args.sizes.split(",")):
            db = await _open(args.backend, args.dsn, Path(tmp), count)
            try:
                await migrate(db, SystemClock())
                async with db.transaction() as tx:
                    await tx.execute("DELETE FROM credentials")
                t0 = time.perf_counter()
                await _fill(db, count)
                fill_s = time.perf_counter() - t0
                result = await _measure(db, count, args.lookups)
                result["fill_s"] = round(fill_s, 1)
                results.append(result)
                print(json.dumps(result))
            finally:
                await db.close()
    smallest, largest = results[0], results[-1]
    print(
        json.dumps(
            {
                "date": datetime.now(UTC).date().isoformat(),
                "machine": f"{platform.machine()} {os.cpu_count()} cores, "
                f"Python {platform.python_version()}",
                "backend": args.backend,
                "p50_ratio_largest_vs_smallest": round(largest["p50_us"] / smallest["p50_us"], 2),
                "cpu_ratio_largest_vs_smallest": round(
                    largest["cpu_us_per_lookup"] / smallest["cpu_us_per_lookup"], 2
                ),
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
