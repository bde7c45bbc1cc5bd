"""First start, restarts and crashes of the real process."""

from __future__ import annotations

import json
import stat
import subprocess
from pathlib import Path

from e2e.conftest import ADMIN
from e2e.gateway import Gateway, GatewayFactory, run_cli


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_first_start_creates_private_data_dir_and_prints_token_once(
    gateway_factory: GatewayFactory,
) -> None:
    gw = gateway_factory().start()
    data = gw.data_dir
    assert _mode(data) == 0o700
    assert _mode(data / "master.key") == 0o600
    assert _mode(data / "fleetgate.db") == 0o600
    config = (data / "fleetgate.toml").read_text()
    assert config.lstrip().startswith("#")
    assert 'listen = "127.0.0.1:8080"' in config

    printed = [line.strip() for line in gw.stdout_lines if line.strip().startswith("fgt_")]
    assert len(printed) == 1
    token = printed[0]
    with gw.client(token) as api:
        assert api.get("/v1/whoami").json()["role"] == "admin"
    # The token went to stdout once; neither the log nor the database holds it in clear.
    assert token not in json.dumps(gw.events)
    assert gw.stop() == 0
    for name in ("fleetgate.db", "fleetgate.db-wal"):
        path = data / name
        if path.exists():
            assert token.encode() not in path.read_bytes()

    again = gateway_factory(data_dir=data).start()
    assert not any(line.strip().startswith("fgt_") for line in again.stdout_lines)
    with again.client(token) as api:
        assert api.get("/v1/devices").status_code == 200


def test_curl_lists_devices_with_the_bootstrap_token(gateway: Gateway) -> None:
    result = subprocess.run(
        [
            "curl",
            "--silent",
            "--show-error",
            "--write-out",
            "\n%{http_code} %{content_type}",
            "-H",
            f"Authorization: Bearer {ADMIN}",
            f"{gateway.url}/v1/devices",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    body, _, status_line = result.stdout.rpartition("\n")
    assert status_line == "200 application/json"
    assert json.loads(body) == {"items": [], "next_cursor": None}


def test_device_added_by_cli_survives_restart_and_kill_9(gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory(FLEETGATE_ADMIN_TOKEN=ADMIN).start()
    added = run_cli(
        gw,
        "device",
        "add",
        "meter-7",
        "--attr",
        "imsi=440101234567890",
        "--address",
        "10.1.2.3",
        "--json",
        token=ADMIN,
    )
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["attributes"] == {"imsi": "440101234567890"}
    with gw.client(ADMIN) as api:
        assert [d["id"] for d in api.get("/v1/devices").json()["items"]] == ["meter-7"]

    assert gw.stop() == 0
    gw.start()
    # Confirmed by the API, then the process dies without any chance to flush.
    second = run_cli(gw, "device", "add", "meter-8", token=ADMIN)
    assert second.returncode == 0, second.stderr
    gw.kill9()

    gw.start()
    with gw.client(ADMIN) as api:
        listed = api.get("/v1/devices").json()["items"]
    assert [d["id"] for d in listed] == ["meter-7", "meter-8"]
    assert listed[0]["addresses"] == ["10.1.2.3"]


def test_sigterm_drains_and_exits_zero(gateway: Gateway) -> None:
    with gateway.client(None) as api:
        assert api.get("/healthz").json() == {"status": "ok"}
        assert api.get("/readyz").status_code == 200
    assert gateway.stop() == 0
    names = [e.get("event") for e in gateway.events]
    assert names.index("gateway.draining") < names.index("gateway.stopped")


def test_the_start_says_which_relay_runs(gateway: Gateway) -> None:
    # The installed package compiled the relay (scripts/test installs gcc for it).
    assert gateway.wait_for("gateway.started")["relay"] == "compiled"
