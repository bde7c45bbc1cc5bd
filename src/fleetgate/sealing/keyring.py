"""Master keys: where they live, how they are named, which one seals new data.

A key file holds one key per line (``base64`` of 32 random bytes), newest last; ``#`` starts a
comment. ``FLEETGATE_MASTER_KEY`` may hold one or more comma-separated keys instead, newest first.
A key's id is derived from the key itself, so the same key always has the same id wherever it is
configured, and the id stored beside a sealed secret names the key that opens it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from fleetgate.errors import ConfigError, SealingError
from fleetgate.sealing.secret import Secret

KEY_BYTES = 32
ENV_VAR = "FLEETGATE_MASTER_KEY"

_FILE_HEADER = """\
# fleetgate master sealing keys: one base64 key per line, newest (active) last.
# Anyone holding this file can open every sealed secret: keep it 0600 and back it up apart
# from the database. `fleetgate keys rotate` adds a key and re-seals everything under it.
"""


@dataclass(frozen=True)
class MasterKey:
    key_id: str
    material: Secret = field(repr=False)

    @classmethod
    def from_bytes(cls, raw: bytes) -> MasterKey:
        if len(raw) != KEY_BYTES:
            raise ConfigError(f"a master key must be {KEY_BYTES} bytes, got {len(raw)}")
        key_id = "mk-" + hashlib.sha256(b"fleetgate master key id\0" + raw).hexdigest()[:16]
        return cls(key_id=key_id, material=Secret(raw))

    @classmethod
    def generate(cls) -> MasterKey:
        return cls.from_bytes(secrets.token_bytes(KEY_BYTES))

    def encoded(self) -> str:
        return base64.b64encode(self.material.reveal()).decode()


def _decode(text: str, where: str) -> MasterKey:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(
            f"{where}: not valid base64; expected 32 random bytes in base64"
        ) from None
    try:
        return MasterKey.from_bytes(raw)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc.detail}") from None


def _file_stamp(path: Path | None) -> tuple[int, int, int] | None:
    """What changes whenever the key file is rewritten (``os.replace`` gives a new inode)."""
    if path is None:
        return None
    try:
        info = path.stat()
    except OSError:
        return None
    return (info.st_ino, info.st_mtime_ns, info.st_size)


class Keyring:
    """The keys that can open sealed data; the active one seals new data."""

    def __init__(
        self,
        keys: Iterable[MasterKey],
        *,
        path: Path | None = None,
        stamp: tuple[int, int, int] | None = None,
    ) -> None:
        ordered = list(keys)
        if not ordered:
            where = f"{path} holds no key" if path else "no master key configured"
            raise ConfigError(f"{where}; set FLEETGATE_MASTER_KEY or add a key to the key file")
        self._keys = {k.key_id: k for k in ordered}
        self._active = ordered[-1]
        self.path = path
        # Taken before the file was read, so a rewrite in between is noticed next time.
        self._stamp = stamp if stamp is not None else _file_stamp(path)

    def _refresh(self) -> None:
        """Pick up a rotation made by another process (``fleetgate keys rotate``)."""
        if self.path is None or _file_stamp(self.path) == self._stamp:
            return
        fresh = Keyring.from_file(self.path)
        self._keys, self._active, self._stamp = fresh._keys, fresh._active, fresh._stamp

    @property
    def active(self) -> MasterKey:
        self._refresh()
        return self._active

    @property
    def key_ids(self) -> list[str]:
        return list(self._keys)

    def get(self, key_id: str) -> MasterKey:
        key = self._keys.get(key_id)
        if key is None:
            self._refresh()
            key = self._keys.get(key_id)
        if key is None:
            raise SealingError(f"master key {key_id} is not in the keyring")
        return key

    @classmethod
    def from_env(cls, value: str) -> Keyring:
        parts = [p for p in value.split(",") if p.strip()]
        keys = [_decode(p, f"{ENV_VAR}[{i}]") for i, p in enumerate(parts)]
        # The environment lists the active key first; the keyring keeps it last.
        return cls(reversed(keys))

    @classmethod
    def from_file(cls, path: Path) -> Keyring:
        stamp = _file_stamp(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"master key file {path}: {exc.strerror}") from None
        keys = []
        for number, line in enumerate(text.splitlines(), start=1):
            stripped = line.strip()
            if stripped and not stripped.startswith("#"):
                keys.append(_decode(stripped, f"{path}:{number}"))
        return cls(keys, path=path, stamp=stamp)

    @classmethod
    def create_file(cls, path: Path) -> Keyring:
        """Write a new key file with one fresh key (mode 0600, never overwriting)."""
        key = MasterKey.generate()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(_FILE_HEADER + key.encoded() + "\n")
            f.flush()
            os.fsync(f.fileno())
        return cls([key], path=path)

    def write_file(self, path: Path, keys: list[MasterKey]) -> None:
        """Replace the key file atomically with ``keys`` (oldest first)."""
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(_FILE_HEADER + "".join(k.encoded() + "\n" for k in keys))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self._keys = {k.key_id: k for k in keys}
        self._active = keys[-1]
        self.path = path
        self._stamp = _file_stamp(path)

    def all_keys(self) -> list[MasterKey]:
        return list(self._keys.values())


def load_keyring(path: Path, env: dict[str, str]) -> Keyring:
    """The environment wins over the file, so a container can keep keys out of the volume."""
    value = env.get(ENV_VAR, "").strip()
    if value:
        return Keyring.from_env(value)
    return Keyring.from_file(path)
