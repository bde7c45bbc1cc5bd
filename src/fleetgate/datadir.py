"""The data directory: created on first start with safe permissions and a commented config."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from fleetgate.errors import ConfigError
from fleetgate.logs import get_logger

log = get_logger("fleetgate.datadir")
DEFAULT_DATA_DIR = "./fleetgate-data"
CONFIG_NAME = "fleetgate.toml"


@dataclass(frozen=True)
class DataDir:
    path: Path
    config_path: Path
    created: bool

    def resolve(self, relative: str) -> Path:
        """A path from the config: relative ones live in the data directory."""
        candidate = Path(relative).expanduser()
        return candidate if candidate.is_absolute() else self.path / candidate


def _write_new(path: Path, text: str, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def prepare(path: Path, config_path: Path | None = None) -> DataDir:
    """Create the directory (0700) and a default config on first start; check them after."""
    path = path.expanduser().absolute()
    created = False
    if not path.exists():
        try:
            path.mkdir(mode=0o700, parents=True)
        except OSError as exc:
            raise ConfigError(f"data directory {path}: cannot create: {exc.strerror}") from None
        os.chmod(path, 0o700)  # mkdir's mode is filtered by the umask
        created = True
    elif not path.is_dir():
        raise ConfigError(f"data directory {path} exists and is not a directory")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning(
            "datadir.permissions_open",
            path=str(path),
            mode=oct(mode),
            fix=f"chmod 700 {path}",
        )
    config = config_path.expanduser().absolute() if config_path else path / CONFIG_NAME
    if config_path is None and not config.exists():
        from fleetgate.config.load import default_config_text

        _write_new(config, default_config_text(), 0o600)
    return DataDir(path=path, config_path=config, created=created)
