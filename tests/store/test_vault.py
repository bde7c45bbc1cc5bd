"""Sealed secrets through Vault: round trips, binding to the name, and master key rotation."""

from __future__ import annotations

import pytest

from fleetgate.clock import FakeClock
from fleetgate.errors import SealingError
from fleetgate.records import Role
from fleetgate.sealing import Keyring, MasterKey, Secret
from fleetgate.services.context import SYSTEM_CALLER
from fleetgate.services.vault import RESEAL_BATCH, Vault
from fleetgate.store import Database

from .helpers import audit_entries, caller, rows

PLAINTEXT = "correct horse battery staple: s3cr3t-PSK-value"


@pytest.fixture
def old_key() -> MasterKey:
    return MasterKey.generate()


@pytest.fixture
def vault(db: Database, old_key: MasterKey, clock: FakeClock) -> Vault:
    return Vault(db, Keyring([old_key]), clock)


async def test_put_get_round_trip(vault: Vault) -> None:
    await vault.put("wg/psk", Secret(PLAINTEXT))
    await vault.put("binary", Secret(bytes(range(256))))
    assert await vault.get("wg/psk") == Secret(PLAINTEXT)
    assert await vault.get("binary") == Secret(bytes(range(256)))
    assert await vault.get("missing") is None

    await vault.put("wg/psk", Secret("replaced"))
    assert await vault.get("wg/psk") == Secret("replaced")
    assert await vault.delete("wg/psk") is True
    assert await vault.delete("wg/psk") is False
    assert await vault.get("wg/psk") is None


async def test_the_plaintext_is_not_stored(vault: Vault, db: Database, old_key: MasterKey) -> None:
    await vault.put("wg/psk", Secret(PLAINTEXT))
    (row,) = await rows(db, "sealed_secrets")
    assert row["name"] == "wg/psk"
    assert row["key_id"] == old_key.key_id
    ciphertext, nonce = bytes(row["ciphertext"]), bytes(row["nonce"])
    assert PLAINTEXT.encode() not in ciphertext
    assert PLAINTEXT.encode()[:8] not in ciphertext
    assert len(nonce) == 12
    assert len(ciphertext) == len(PLAINTEXT) + 16  # AES-GCM: same length plus the tag
    for value in row.values():
        assert PLAINTEXT not in str(value)

    # A second seal of the same value uses a new nonce, so it looks different.
    await vault.put("wg/psk", Secret(PLAINTEXT))
    (again,) = await rows(db, "sealed_secrets")
    assert bytes(again["nonce"]) != nonce
    assert bytes(again["ciphertext"]) != ciphertext


async def test_a_box_copied_to_another_name_fails_to_open(vault: Vault, db: Database) -> None:
    await vault.put("device/a", Secret(PLAINTEXT))
    async with db.transaction() as tx:
        await tx.execute(
            "INSERT INTO sealed_secrets (name, key_id, nonce, ciphertext, updated_at) "
            "SELECT ?, key_id, nonce, ciphertext, updated_at FROM sealed_secrets WHERE name = ?",
            "device/b",
            "device/a",
        )
    with pytest.raises(SealingError, match="device/b"):
        await vault.get("device/b")
    assert await vault.get("device/a") == Secret(PLAINTEXT)


async def test_a_tampered_box_fails_to_open(vault: Vault, db: Database) -> None:
    await vault.put("device/a", Secret(PLAINTEXT))
    (row,) = await rows(db, "sealed_secrets")
    flipped = bytearray(row["ciphertext"])
    flipped[0] ^= 0x01
    async with db.transaction() as tx:
        await tx.execute(
            "UPDATE sealed_secrets SET ciphertext = ? WHERE name = ?", bytes(flipped), "device/a"
        )
    with pytest.raises(SealingError):
        await vault.get("device/a")


async def test_a_keyring_without_the_key_cannot_open(
    vault: Vault, db: Database, clock: FakeClock
) -> None:
    await vault.put("device/a", Secret(PLAINTEXT))
    stranger = Vault(db, Keyring([MasterKey.generate()]), clock)
    with pytest.raises(SealingError, match="not in the keyring"):
        await stranger.get("device/a")


async def test_rotation_reseals_everything_under_the_new_key(
    db: Database, old_key: MasterKey, vault: Vault, clock: FakeClock
) -> None:
    values = {f"device/{n:03d}": Secret(f"psk-{n}") for n in range(RESEAL_BATCH + 5)}
    for name, value in values.items():
        await vault.put(name, value)
    assert await vault.key_usage() == {old_key.key_id: len(values)}

    new_key = MasterKey.generate()
    rotated = Vault(db, Keyring([old_key, new_key]), clock)
    # Sealing already uses the new key; old boxes still open.
    await rotated.put("device/new", Secret("fresh"))
    values["device/new"] = Secret("fresh")
    assert await rotated.get("device/000") == values["device/000"]

    report = await rotated.reseal_all(caller(Role.ADMIN, token_id="tok_rotator"))
    assert report.key_id == new_key.key_id
    assert report.resealed == len(values) - 1  # the one already under the new key is left alone
    assert report.retired_key_ids == (old_key.key_id,)

    stored = await rows(db, "sealed_secrets", "name")
    assert {r["key_id"] for r in stored} == {new_key.key_id}
    assert await rotated.key_usage() == {new_key.key_id: len(values)}
    for name, value in values.items():
        assert await rotated.get(name) == value
    # The new key alone now opens everything: the old one can go.
    new_only = Vault(db, Keyring([new_key]), clock)
    assert await new_only.get("device/001") == values["device/001"]

    (entry,) = await audit_entries(db, action="keys.rotate")
    assert entry.actor == "token:tok_rotator"
    assert entry.target_id == new_key.key_id
    assert entry.after == {"resealed": report.resealed, "active_key_id": new_key.key_id}

    # Running it again is harmless: nothing left to re-seal.
    again = await rotated.reseal_all(SYSTEM_CALLER)
    assert (again.resealed, again.retired_key_ids) == (0, (old_key.key_id,))
