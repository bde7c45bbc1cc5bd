"""Configuration failures at start, reload on SIGHUP, and the CLI's exit codes."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

from e2e.conftest import ADMIN
from e2e.gateway import Gateway, GatewayFactory, base_env, fleetgate_argv, free_port, run_cli


def _serve_once(data_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        fleetgate_argv("serve", "--data", str(data_dir)),
        env=base_env(FLEETGATE_API__LISTEN=f"127.0.0.1:{free_port()}", **env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_broken_config_exits_nonzero_naming_the_key(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    (data / "fleetgate.toml").write_text('[log]\nformat = "xml"\n[api]\nlistn = "x"\n')
    result = _serve_once(data)
    assert result.returncode == 78
    assert "log.format: 'xml' is not allowed; choose json|console" in result.stderr
    assert "api.listn: unknown key; valid keys here:" in result.stderr


def test_bad_environment_override_names_the_variable(tmp_path: Path) -> None:
    result = _serve_once(tmp_path / "data", FLEETGATE_STORE__BACKEND="mysql")
    assert result.returncode == 78
    assert "store.backend (from FLEETGATE_STORE__BACKEND)" in result.stderr


def test_invalid_toml_is_reported(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    (data / "fleetgate.toml").write_text("[api\n")
    result = _serve_once(data)
    assert result.returncode == 78
    assert "not valid TOML" in result.stderr


def test_config_check_command(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    (data / "fleetgate.toml").write_text("[api]\nlisten = 'nowhere'\n")
    result = subprocess.run(
        fleetgate_argv("config", "check", "--data", str(data)),
        env=base_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 78
    assert "api.listen" in result.stderr


def test_sighup_applies_a_new_listener_and_keeps_the_old_config_on_error(
    gateway: Gateway,
) -> None:
    config = gateway.data_dir / "fleetgate.toml"
    original = config.read_text()
    port = free_port()
    config.write_text(
        original + f'\n[listeners.plc]\nbind = "127.0.0.1:{port}"\nforward_to = "127.0.0.1:9"\n'
    )
    gateway.signal(signal.SIGHUP)
    gateway.wait_for("config.reloaded")
    with gateway.client(None) as api:
        ready = api.get("/readyz").json()
    assert ready["checks"]["listeners"] == {"plc": "bound"}

    config.write_text(original + "\n[listeners.plc]\nbind = 'bad'\n")
    gateway.signal(signal.SIGHUP)
    failed = gateway.wait_for("config.reload_failed")
    assert "listeners.plc.bind" in failed["detail"]
    with gateway.client(None) as api:
        assert api.get("/readyz").json()["checks"]["listeners"] == {"plc": "bound"}


def test_sighup_names_the_sessions_table_as_needing_a_restart(gateway: Gateway) -> None:
    config = gateway.data_dir / "fleetgate.toml"
    original = config.read_text()
    try:
        since = len(gateway.events)
        assert 'ports = "20000-20999"' in original
        config.write_text(original.replace('ports = "20000-20999"', 'ports = "23000-23009"'))
        gateway.signal(signal.SIGHUP)
        said = gateway.wait_for("config.restart_required", since=since)
        assert said["keys"] == ["sessions"]
    finally:
        since = len(gateway.events)
        config.write_text(original)
        gateway.signal(signal.SIGHUP)
        gateway.wait_for("config.reloaded", since=since)


def test_cli_exit_codes_follow_the_error_table(gateway: Gateway, tmp_path: Path) -> None:
    assert run_cli(gateway, "device", "show", "ghost", token=ADMIN).returncode == 66
    assert run_cli(gateway, "device", "add", "d", token=ADMIN).returncode == 0
    conflict = run_cli(gateway, "device", "add", "d", token=ADMIN)
    assert conflict.returncode == 73
    assert "already exists" in conflict.stderr
    assert run_cli(gateway, "device", "list", token="wrong").returncode == 77
    bad = run_cli(gateway, "device", "add", "e", "--attr", "Bad-Key=1", token=ADMIN)
    assert bad.returncode == 65
    unreachable = run_cli(
        gateway, "device", "list", token=ADMIN, env={"FLEETGATE_URL": "http://127.0.0.1:1"}
    )
    assert unreachable.returncode == 69
    assert "cannot reach" in unreachable.stderr


def test_cli_covers_groups_tokens_and_audit(gateway: Gateway) -> None:
    def ok(*args: str, token: str = ADMIN) -> str:
        result = run_cli(gateway, *args, token=token)
        assert result.returncode == 0, result.stderr
        return result.stdout

    ok("group", "add", "plant", "--description", "Tokyo", "--settings", '{"region": "jp"}')
    ok("device", "add", "p1", "--group", "plant", "--attr", "model=x")
    ok("device", "update", "p1", "--unset-attr", "model", "--attr", "imsi=440100000001")
    ok("device", "disable", "p1")
    shown = json.loads(ok("device", "show", "p1", "--json"))
    assert shown["status"] == "disabled"
    assert shown["attributes"] == {"imsi": "440100000001"}
    table = ok("device", "list", "--group", "plant")
    assert table.splitlines()[0].split() == [
        "ID",
        "NAME",
        "GROUP",
        "STATUS",
        "ADDRESSES",
        "ATTRIBUTES",
    ]
    created = json.loads(ok("token", "create", "--name", "ro", "--role", "viewer", "--json"))
    assert ok("token", "whoami", "--json", token=created["secret"]).count('"viewer"') == 1
    listed = json.loads(ok("token", "list", "--json"))
    assert created["token"]["id"] in [t["id"] for t in listed["items"]]
    ok("token", "revoke", created["token"]["id"])
    assert run_cli(gateway, "token", "whoami", token=created["secret"]).returncode == 77
    ok("device", "delete", "p1")
    ok("group", "delete", "plant")
    actions = [e["action"] for e in json.loads(ok("audit", "--json", "--all"))["items"]]
    assert actions[:3] == ["group.delete", "device.delete", "token.delete"]


def test_cli_config_problems_are_reported(gateway: Gateway, tmp_path: Path) -> None:
    missing = run_cli(
        gateway,
        "device",
        "list",
        token=None,
        env={"FLEETGATE_CLI_CONFIG": str(tmp_path / "nope.toml")},
    )
    assert missing.returncode == 78
    assert "does not exist" in missing.stderr
    loose = tmp_path / "loose.toml"
    loose.write_text(f'token = "{ADMIN}"\n')
    loose.chmod(0o644)
    warned = run_cli(
        gateway, "device", "list", token=None, env={"FLEETGATE_CLI_CONFIG": str(loose)}
    )
    assert warned.returncode == 0, warned.stderr
    assert "chmod 600" in warned.stderr


def test_cli_reads_url_and_token_from_its_config_file(
    gateway: Gateway, gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    del gateway_factory
    cli_config = tmp_path / "cli.toml"
    cli_config.write_text(f'url = "{gateway.url}"\ntoken = "{ADMIN}"\n')
    result = subprocess.run(
        fleetgate_argv("device", "list", "--json"),
        env=base_env(FLEETGATE_CLI_CONFIG=str(cli_config)),
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["items"] == []
