"""`fleetgate credential export`: the key lands in a new 0600 file, once."""

from __future__ import annotations

import stat
from pathlib import Path

from e2e.conftest import ADMIN
from e2e.gateway import Gateway, run_cli


def test_export_writes_a_private_file_once(gateway: Gateway, tmp_path: Path) -> None:
    assert run_cli(gateway, "device", "add", "m1", token=ADMIN).returncode == 0
    issued = run_cli(gateway, "cert", "issue", "m1", "--generate-key", "ec-p256", token=ADMIN)
    assert issued.returncode == 0, issued.stderr
    out = tmp_path / "m1.pem"
    taken = tmp_path / "taken.pem"
    taken.write_text("keep me")
    refused = run_cli(
        gateway, "credential", "export", "device-m1", "--out", str(taken), token=ADMIN
    )
    assert refused.returncode == 2
    assert taken.read_text() == "keep me"
    done = run_cli(gateway, "credential", "export", "device-m1", "--out", str(out), token=ADMIN)
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in out.read_bytes()
    second = tmp_path / "again.pem"
    again = run_cli(gateway, "credential", "export", "device-m1", "--out", str(second), token=ADMIN)
    assert again.returncode == 73
    assert not second.exists()  # nothing was exported, so no empty file is left behind
