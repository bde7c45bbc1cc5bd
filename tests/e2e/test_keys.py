"""`fleetgate keys rotate` on a data directory: everything re-sealed under a new master key."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

from e2e.gateway import GatewayFactory, base_env, fleetgate_argv
from fleetgate.clock import SystemClock
from fleetgate.sealing import Keyring, MasterKey, Secret
from fleetgate.services.vault import Vault
from fleetgate.store.sqlite import SqliteDatabase

SECRETS = {f"credential:dev-{n}:key": Secret(f"private key {n}".encode()) for n in range(5)}


async def _seal_all(data: Path) -> None:
    db = await SqliteDatabase.open(data / "fleetgate.db")
    try:
        vault = Vault(db, Keyring.from_file(data / "master.key"), SystemClock())
        for name, value in SECRETS.items():
            await vault.put(name, value)
    finally:
        await db.close()


async def _open_all(data: Path) -> tuple[dict[str, Secret | None], dict[str, int]]:
    db = await SqliteDatabase.open(data / "fleetgate.db")
    try:
        vault = Vault(db, Keyring.from_file(data / "master.key"), SystemClock())
        return {name: await vault.get(name) for name in SECRETS}, await vault.key_usage()
    finally:
        await db.close()


def test_rotate_reseals_every_secret_and_retires_the_old_key(
    gateway_factory: GatewayFactory,
) -> None:
    gw = gateway_factory(FLEETGATE_ADMIN_TOKEN="t").start()
    assert gw.stop() == 0
    data = gw.data_dir
    old_key_id = Keyring.from_file(data / "master.key").active.key_id
    asyncio.run(_seal_all(data))
    # The CA and OCSP responder keys made on first start are sealed too.
    _, before = asyncio.run(_open_all(data))
    total = before[old_key_id]
    assert total > len(SECRETS)

    result = subprocess.run(
        fleetgate_argv("keys", "rotate", "--data", str(data), "--json"),
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["resealed"] == total
    assert report["removed_key_ids"] == [old_key_id]
    assert report["unused_key_ids"] == []
    assert "backups" in result.stderr
    keyring = Keyring.from_file(data / "master.key")
    assert keyring.key_ids == [report["active_key_id"]] != [old_key_id]

    opened, usage = asyncio.run(_open_all(data))
    assert opened == SECRETS
    assert usage == {report["active_key_id"]: total}

    gw.start()
    with gw.client("t") as api:
        entries = api.get("/v1/audit", params={"action": "keys.rotate"}).json()["items"]
    assert entries[0]["after"] == {"active_key_id": report["active_key_id"], "resealed": total}


def test_a_master_key_that_cannot_open_the_store_is_refused_at_start(
    gateway_factory: GatewayFactory,
) -> None:
    gw = gateway_factory(FLEETGATE_ADMIN_TOKEN="t").start()
    assert gw.stop() == 0  # the CA's keys are sealed now
    wrong = MasterKey.generate().encoded()
    again = gateway_factory(data_dir=gw.data_dir, FLEETGATE_MASTER_KEY=wrong).start(wait=False)
    assert again.wait_exit() == 78
    refusal = " ".join(str(e) for e in again.events)
    assert "does not hold" in refusal
    assert wrong not in refusal
    # Nothing was sealed under the wrong key: the right one still opens everything.
    _, usage = asyncio.run(_open_all(gw.data_dir))
    assert set(usage) == {Keyring.from_file(gw.data_dir / "master.key").active.key_id}
