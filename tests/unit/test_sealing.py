"""Sealing: the Secret type, AES-GCM seal/open, and the master keyring on disk and in env."""

from __future__ import annotations

import base64
import copy
import hmac
import os
import pickle
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetgate.errors import ConfigError, SealingError
from fleetgate.sealing import Keyring, MasterKey, SealedBox, Secret, open_box, seal
from fleetgate.sealing.keyring import ENV_VAR, KEY_BYTES, load_keyring

KEY_A = MasterKey.from_bytes(bytes(range(32)))
KEY_B = MasterKey.from_bytes(bytes(range(100, 132)))
KEY_C = MasterKey.from_bytes(b"\xff" * 32)
RING = Keyring([KEY_A])


def flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


# --- Secret -------------------------------------------------------------------------------


def test_secret_repr_and_str_are_redacted() -> None:
    secret = Secret("hunter2")
    for text in (repr(secret), str(secret), f"{secret}", f"{secret!r}", repr([secret])):
        assert "hunter2" not in text
        assert "**********" in text
    assert "aHVudGVyMg" not in repr(Secret(b"hunter2"))


def test_secret_reveals_its_value() -> None:
    assert Secret("hunter2").reveal() == b"hunter2"
    assert Secret(b"hunter2").reveal_text() == "hunter2"
    assert len(Secret("päss")) == 5


def test_secret_cannot_be_pickled_or_copied() -> None:
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(Secret("hunter2"))
    with pytest.raises(TypeError, match="cannot be pickled"):
        copy.copy(Secret("hunter2"))


def test_secret_equality() -> None:
    assert Secret("abc") == Secret(b"abc")
    assert Secret("abc") != Secret("abd")
    assert Secret("abc") != Secret("abcd")
    assert Secret("abc") != "abc"
    assert Secret("abc") != b"abc"
    assert hash(Secret("abc")) == hash(Secret(b"abc"))
    assert len({Secret("abc"), Secret(b"abc"), Secret("xyz")}) == 2


def test_secret_equality_is_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording)
    assert Secret("abc") == Secret("abc")
    assert Secret("abc") != Secret("xyz")
    assert calls == [(b"abc", b"abc"), (b"abc", b"xyz")]


# --- seal / open --------------------------------------------------------------------------


@given(value=st.binary(max_size=4096), name=st.text(max_size=64))
def test_seal_open_round_trip(value: bytes, name: str) -> None:
    box = seal(RING, name, Secret(value))
    assert box.key_id == KEY_A.key_id
    assert len(box.nonce) == 12
    assert len(value) < 16 or value not in box.ciphertext
    assert open_box(RING, name, box) == Secret(value)


def test_sealing_twice_uses_fresh_nonces() -> None:
    first = seal(RING, "n", Secret("same"))
    second = seal(RING, "n", Secret("same"))
    assert first.nonce != second.nonce
    assert first.ciphertext != second.ciphertext


@given(data=st.data())
def test_tampered_ciphertext_fails(data: st.DataObject) -> None:
    box = seal(RING, "device/x/psk", Secret(b"pre-shared key"))
    index = data.draw(st.integers(min_value=0, max_value=len(box.ciphertext) - 1))
    tampered = SealedBox(box.key_id, box.nonce, flip(box.ciphertext, index))
    with pytest.raises(SealingError, match="failed authentication"):
        open_box(RING, "device/x/psk", tampered)


def test_truncated_ciphertext_fails() -> None:
    box = seal(RING, "n", Secret(b"value"))
    for ciphertext in (box.ciphertext[:-1], box.ciphertext[:5], b""):
        with pytest.raises(SealingError):
            open_box(RING, "n", SealedBox(box.key_id, box.nonce, ciphertext))


@given(index=st.integers(min_value=0, max_value=11))
def test_tampered_nonce_fails(index: int) -> None:
    box = seal(RING, "n", Secret(b"value"))
    with pytest.raises(SealingError, match="failed authentication"):
        open_box(RING, "n", SealedBox(box.key_id, flip(box.nonce, index), box.ciphertext))


@pytest.mark.parametrize("nonce", [b"", b"short"], ids=["empty", "short"])
def test_corrupt_nonce_length_fails_as_sealing_error(nonce: bytes) -> None:
    # A truncated or garbage nonce read back from the store is tampered data like any other.
    box = seal(RING, "n", Secret(b"value"))
    with pytest.raises(SealingError):
        open_box(RING, "n", SealedBox(box.key_id, nonce, box.ciphertext))


def test_opening_under_another_name_fails() -> None:
    box = seal(RING, "device/a/psk", Secret(b"value"))
    with pytest.raises(SealingError, match="'device/b/psk' failed authentication"):
        open_box(RING, "device/b/psk", box)


def test_unknown_key_id_fails() -> None:
    box = seal(RING, "n", Secret(b"value"))
    with pytest.raises(SealingError, match="master key mk-0000 is not in the keyring"):
        open_box(RING, "n", SealedBox("mk-0000", box.nonce, box.ciphertext))
    with pytest.raises(SealingError, match=KEY_A.key_id):
        open_box(Keyring([KEY_B]), "n", box)


def test_old_keys_still_open_after_rotation() -> None:
    old_box = seal(Keyring([KEY_A]), "n", Secret(b"old"))
    rotated = Keyring([KEY_A, KEY_B])
    assert rotated.active == KEY_B
    new_box = seal(rotated, "n", Secret(b"new"))
    assert new_box.key_id == KEY_B.key_id
    assert open_box(rotated, "n", old_box) == Secret(b"old")
    assert open_box(rotated, "n", new_box) == Secret(b"new")


# --- master keys --------------------------------------------------------------------------


def test_key_ids_are_stable_and_distinct() -> None:
    again = MasterKey.from_bytes(bytes(range(32)))
    assert again.key_id == KEY_A.key_id
    assert again == KEY_A
    assert KEY_A.key_id != KEY_B.key_id
    assert KEY_A.key_id.startswith("mk-")
    assert len(KEY_A.key_id) == 3 + 16
    int(KEY_A.key_id[3:], 16)


def test_key_id_does_not_reveal_the_key() -> None:
    assert KEY_A.encoded() not in repr(KEY_A)
    assert repr(bytes(range(32))) not in repr(KEY_A)
    assert KEY_A.key_id in repr(KEY_A)


def test_key_must_be_32_bytes() -> None:
    with pytest.raises(ConfigError, match="must be 32 bytes, got 31"):
        MasterKey.from_bytes(b"x" * 31)
    generated = MasterKey.generate()
    assert len(generated.material) == KEY_BYTES
    assert generated != MasterKey.generate()


def test_empty_keyring_is_refused() -> None:
    with pytest.raises(ConfigError, match="no master key configured"):
        Keyring([])


# --- key files ----------------------------------------------------------------------------


def test_create_file_is_private_and_loadable(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    created = Keyring.create_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = Keyring.from_file(path)
    assert loaded.active == created.active
    assert loaded.key_ids == [created.active.key_id]
    assert path.read_text().startswith("#")


def test_create_file_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    path.write_text("precious\n")
    with pytest.raises(FileExistsError):
        Keyring.create_file(path)
    assert path.read_text() == "precious\n"


def test_from_file_skips_comments_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    path.write_text(
        f"# header\n\n   \n{KEY_A.encoded()}\n  # indented comment\n  {KEY_B.encoded()}  \n\n"
    )
    ring = Keyring.from_file(path)
    assert ring.key_ids == [KEY_A.key_id, KEY_B.key_id]
    assert ring.active == KEY_B
    assert ring.get(KEY_A.key_id) == KEY_A
    assert ring.path == path


def test_from_file_bad_base64_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    path.write_text(f"# header\n{KEY_A.encoded()}\nnot*base64!\n")
    with pytest.raises(ConfigError) as info:
        Keyring.from_file(path)
    assert info.value.detail == (f"{path}:3: not valid base64; expected 32 random bytes in base64")


def test_from_file_wrong_length_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    path.write_text(f"\n{base64.b64encode(b'x' * 16).decode()}\n")
    with pytest.raises(ConfigError) as info:
        Keyring.from_file(path)
    assert info.value.detail == f"{path}:2: a master key must be 32 bytes, got 16"


def test_from_file_missing_or_empty(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"master key file .*absent\.key"):
        Keyring.from_file(tmp_path / "absent.key")
    empty = tmp_path / "empty.key"
    empty.write_text("# only a comment\n\n")
    with pytest.raises(ConfigError, match=r"empty\.key holds no key"):
        Keyring.from_file(empty)


def test_write_file_replaces_atomically_and_privately(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    ring = Keyring.create_file(path)
    old = ring.active
    ring.write_file(path, [old, KEY_B])
    assert ring.active == KEY_B
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["master.key"]
    assert Keyring.from_file(path).key_ids == [old.key_id, KEY_B.key_id]


def test_rotation_written_by_another_keyring_is_picked_up(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    Keyring.create_file(path)
    server = Keyring.from_file(path)
    rotator = Keyring.from_file(path)
    old = server.active

    rotator.write_file(path, [*rotator.all_keys(), KEY_B])
    assert server.active == KEY_B
    box = seal(server, "n", Secret(b"v"))
    assert box.key_id == KEY_B.key_id
    assert open_box(rotator, "n", box) == Secret(b"v")

    # The old key is retired: the server follows, and keeps opening new-key data.
    rotator.write_file(path, [KEY_B])
    assert server.active == KEY_B
    assert server.key_ids == [KEY_B.key_id]
    assert old.key_id not in server.key_ids


def test_get_picks_up_a_key_added_by_another_keyring(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    Keyring.create_file(path)
    reader = Keyring.from_file(path)
    writer = Keyring.from_file(path)
    writer.write_file(path, [*writer.all_keys(), KEY_B])
    box = seal(writer, "n", Secret(b"v"))
    # `get` alone (no `active` call first) must find the new key.
    assert open_box(reader, "n", box) == Secret(b"v")


def test_rotation_with_unchanged_size_and_mtime_is_picked_up(tmp_path: Path) -> None:
    # On a filesystem with coarse timestamps (1-2 s on some network and FAT mounts, a jiffy on
    # ext4) a rotation can finish in the same tick. [A] -> [B] leaves the size unchanged too.
    path = tmp_path / "master.key"
    writer = Keyring([KEY_A])
    writer.write_file(path, [KEY_A])
    server = Keyring.from_file(path)
    before = path.stat()
    writer.write_file(path, [KEY_B])
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size
    assert server.active == KEY_B


def test_keyring_without_file_never_reloads(tmp_path: Path) -> None:
    ring = Keyring([KEY_A])
    assert ring.path is None
    assert ring.active == KEY_A
    with pytest.raises(SealingError):
        ring.get(KEY_B.key_id)


# --- environment --------------------------------------------------------------------------


def test_from_env_lists_newest_first() -> None:
    ring = Keyring.from_env(f"{KEY_B.encoded()},{KEY_A.encoded()}")
    assert ring.active == KEY_B
    assert set(ring.key_ids) == {KEY_A.key_id, KEY_B.key_id}
    assert ring.get(KEY_A.key_id) == KEY_A


def test_from_env_tolerates_spaces_and_empty_parts() -> None:
    ring = Keyring.from_env(f" {KEY_C.encoded()} ,, {KEY_A.encoded()} ,")
    assert ring.active == KEY_C
    assert set(ring.key_ids) == {KEY_A.key_id, KEY_C.key_id}


def test_from_env_bad_key_names_the_position() -> None:
    with pytest.raises(ConfigError) as info:
        Keyring.from_env(f"{KEY_A.encoded()},garbage!")
    assert info.value.detail.startswith(f"{ENV_VAR}[1]: not valid base64")
    with pytest.raises(ConfigError, match=rf"{ENV_VAR}\[0\]: a master key must be 32 bytes"):
        Keyring.from_env(base64.b64encode(b"short").decode())


def test_same_key_has_same_id_from_env_and_file(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    path.write_text(KEY_C.encoded() + "\n")
    assert Keyring.from_file(path).active.key_id == Keyring.from_env(KEY_C.encoded()).active.key_id


def test_load_keyring_prefers_env_over_file(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    path.write_text(KEY_A.encoded() + "\n")
    assert load_keyring(path, {ENV_VAR: KEY_B.encoded()}).active == KEY_B
    assert load_keyring(path, {ENV_VAR: "   "}).active == KEY_A
    assert load_keyring(path, {}).active == KEY_A
