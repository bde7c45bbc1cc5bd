"""Configuration: the shipped defaults, key-path errors, environment overrides, secrets."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from fleetgate.config import Config, load_config, parse_config
from fleetgate.config.load import apply_env_overrides, default_config_text
from fleetgate.config.schema import (
    AlertConfig,
    ApiConfig,
    ListenerConfig,
    LogConfig,
    NodeConfig,
    PkiConfig,
    SealingConfig,
    SessionsConfig,
    StoreConfig,
    split_host_port,
)
from fleetgate.errors import ConfigError
from fleetgate.sealing import Secret

LISTENER = '[listeners.plc]\nbind = "0.0.0.0:5020"\nforward_to = "10.0.0.20:502"\n'
DSN = "postgresql://fleetgate:hunter2-s3cret@db.internal:5432/fleetgate"


def config_error(text: str, env: dict[str, str] | None = None, source: str = "config") -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(text, env or {}, source=source)
    return info.value.detail


# --- the shipped default file -------------------------------------------------------------


def test_shipped_default_toml_parses_to_the_model_defaults() -> None:
    parsed = parse_config(default_config_text(), {})
    assert parsed == Config()
    assert parsed.api.listen == "127.0.0.1:8080"
    assert parsed.log.format == "json"
    assert parsed.store.backend == "sqlite"
    assert parsed.store.postgresql_dsn is None
    assert parsed.listeners == {}


def test_shipped_default_toml_shows_every_key() -> None:
    text = default_config_text()
    sections: list[tuple[str, type[BaseModel]]] = [
        ("node", NodeConfig),
        ("api", ApiConfig),
        ("log", LogConfig),
        ("store", StoreConfig),
        ("sealing", SealingConfig),
        ("pki", PkiConfig),
        ("pki.alerts", AlertConfig),
        ("sessions", SessionsConfig),
    ]
    for section, model in sections:
        assert f"\n[{section}]\n" in text
        for key, info in model.model_fields.items():
            if isinstance(info.default, BaseModel):
                continue  # a sub-table, checked as its own section
            # Keys without a default value (the DSN, which holds a password; URLs that
            # depend on the site) are shown commented out.
            commented = key in ("postgresql_dsn", "public_url", "webhook_url", "public_host")
            shown = f"\n# {key} = " if commented else f"\n{key} = "
            assert shown in text, f"{section}.{key} is not in default.toml"


def test_commented_listener_example_in_default_toml_is_valid() -> None:
    lines = default_config_text().splitlines()
    start = lines.index("# [listeners.plc]")
    example = "\n".join(line.removeprefix("# ") for line in lines[start:])
    parsed = parse_config(default_config_text() + "\n" + example + "\n", {})
    plc = parsed.listeners["plc"]
    assert plc.bind == "0.0.0.0:5020"
    assert plc.forward_to == "10.0.0.20:502"
    assert plc.idle_timeout_s == 3600.0


def test_empty_text_is_the_defaults() -> None:
    assert parse_config("", {}) == Config()


# --- errors name the key path and the fix -------------------------------------------------


def test_unknown_key_lists_the_valid_keys_of_its_table() -> None:
    detail = config_error('[api]\nlistn = "127.0.0.1:1"\n')
    assert detail == (
        "config: api.listn: unknown key; valid keys here: drain_timeout_s, listen, max_body_bytes"
    )


def test_unknown_top_level_key_lists_the_top_level_keys() -> None:
    detail = config_error("nodename = 'x'\n")
    assert "nodename: unknown key; valid keys here: " in detail
    assert "api, destinations, listeners, log, node, pki, sealing, sessions, store" in detail


def test_unknown_key_inside_a_listener_lists_listener_keys() -> None:
    detail = config_error(LISTENER + "max_conns = 5\n")
    assert "listeners.plc.max_conns: unknown key; valid keys here: " in detail
    for key in ListenerConfig.model_fields:
        assert key in detail


def test_wrong_literal_lists_the_choices() -> None:
    assert config_error('[log]\nformat = "xml"\n') == (
        "config: log.format: 'xml' is not allowed; choose json|console"
    )
    assert config_error('[log]\nlevel = "loud"\n') == (
        "config: log.level: 'loud' is not allowed; choose debug|info|warning|error"
    )


@pytest.mark.parametrize(
    ("address", "fragment"),
    [
        ("localhost", "is not HOST:PORT (for example 127.0.0.1:8080 or [::1]:8080)"),
        ("127.0.0.1:70000", "the port must be a number from 0 to 65535"),
        ("127.0.0.1:http", "the port must be a number from 0 to 65535"),
        ("::1:8080", "write an IPv6 host in brackets, like [::1]:8080"),
    ],
)
def test_bad_address_names_the_key_and_the_fix(address: str, fragment: str) -> None:
    detail = config_error(f'[api]\nlisten = "{address}"\n')
    assert detail.startswith("config: api.listen: ")
    assert fragment in detail
    assert repr(address) in detail


def test_listener_missing_required_keys_names_each_one() -> None:
    detail = config_error('[listeners.plc]\nprotocol = "tcp"\n')
    assert detail == "config: listeners.plc.bind: required key is missing; add it"


def test_listener_destination_must_be_configured() -> None:
    detail = config_error(
        '[listeners.mqtt]\nprotocol = "mqtt"\nbind = "127.0.0.1:1883"\ndestination = "broker"\n'
    )
    assert "listeners.mqtt.destination: no [destinations.broker]" in detail


def test_destination_checks_pins_templates_and_mounts() -> None:
    base = '[destinations.broker]\naddress = "broker.example:8883"\n'
    assert "not a base64 SHA-256" in config_error(base + 'pin_sha256 = ["abc"]\n')
    assert "placeholder" in config_error(base + 'credential = "aws-#{IMSI}"\n')
    assert "ends with '/'" in config_error(base + 'topic_mount = "devices/#{device_id}"\n')
    assert "does not start with '$'" in config_error(base + 'topic_mount = "$SYS/"\n')
    good = parse_config(
        base
        + 'pin_sha256 = ["47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="]\n'
        + 'credential = "aws-#{imsi}"\ntopic_mount = "devices/#{device_id}/"\n',
        {},
    )
    assert good.destinations["broker"].credential == "aws-#{imsi}"


def test_username_identity_needs_a_password_credential_and_a_protocol_with_logins() -> None:
    mqtt = '[listeners.m]\nprotocol = "mqtt"\nbind = "127.0.0.1:1883"\nidentity = "username"\n'
    assert "needs password_credential" in config_error(mqtt)
    tcp = mqtt.replace('"mqtt"', '"tcp"') + 'password_credential = "login-#{device_id}"\n'
    assert "needs protocol mqtt or http" in config_error(tcp)
    odd = mqtt + 'password_credential = "l-#{device_id}"\nusername_field = "name"\n'
    assert "username_field is one of" in config_error(odd)


def test_listener_bad_address_names_the_listener() -> None:
    detail = config_error('[listeners.plc]\nbind = "0.0.0.0"\nforward_to = "10.0.0.1:1"\n')
    assert detail.startswith("config: listeners.plc.bind: '0.0.0.0' is not HOST:PORT")


def test_listener_name_must_be_lowercase() -> None:
    detail = config_error(LISTENER.replace("plc", "PLC"))
    assert "listeners.PLC" in detail
    assert "does not match" in detail


def test_postgresql_backend_without_dsn_says_how_to_set_it() -> None:
    detail = config_error('[store]\nbackend = "postgresql"\n')
    assert detail.startswith("config: store: backend is postgresql but postgresql_dsn is not set")
    assert "FLEETGATE_STORE__POSTGRESQL_DSN" in detail


def test_out_of_range_number_names_the_key() -> None:
    detail = config_error("[api]\nmax_body_bytes = 10\n")
    assert detail == "config: api.max_body_bytes: Input should be greater than or equal to 1024"


def test_wrong_type_shows_the_value() -> None:
    detail = config_error("[api]\nlisten = 8080\n")
    assert detail.startswith("config: api.listen: ")
    assert "(got 8080)" in detail


def test_invalid_toml_names_the_source() -> None:
    detail = config_error("[api\nlisten = 1\n", source="/etc/fleetgate/fleetgate.toml")
    assert detail.startswith("/etc/fleetgate/fleetgate.toml: not valid TOML: ")


def test_several_problems_are_all_reported() -> None:
    detail = config_error('[log]\nformat = "xml"\nlevel = "loud"\n[api]\nlistn = 1\n')
    assert detail.startswith("config: 3 problems:\n")
    assert "log.format" in detail
    assert "log.level" in detail
    assert "api.listn" in detail


# --- environment overrides ----------------------------------------------------------------


def test_env_override_replaces_file_value_with_toml_typed_values() -> None:
    config = parse_config(
        "[api]\nmax_body_bytes = 4096\n",
        {
            "FLEETGATE_API__MAX_BODY_BYTES": "2048",
            "FLEETGATE_API__DRAIN_TIMEOUT_S": "2.5",
            "FLEETGATE_API__LISTEN": "0.0.0.0:9090",
            "FLEETGATE_LOG__FORMAT": "console",
        },
    )
    assert config.api.max_body_bytes == 2048
    assert config.api.drain_timeout_s == 2.5
    assert config.api.listen == "0.0.0.0:9090"
    assert config.log.format == "console"


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("10", "10"),
        ("true", "true"),
        ("2.5", "2.5"),
        ("[1, 2]", [1, 2]),
        ('{a = "b"}', {"a": "b"}),
        ("[not toml", "[not toml"),
        ('"quoted"', '"quoted"'),
        ("console", "console"),
        ("0.0.0.0:8080", "0.0.0.0:8080"),
        ("postgresql://u:p@h:5432/db", "postgresql://u:p@h:5432/db"),
        ("", ""),
    ],
)
def test_env_values_are_text_unless_they_are_toml_arrays_or_tables(text: str, value: Any) -> None:
    data, _ = apply_env_overrides({}, {"FLEETGATE_SECTION__KEY": text})
    assert data == {"section": {"key": value}}
    assert type(data["section"]["key"]) is type(value)


def test_env_overrides_record_their_origin_and_do_not_mutate_the_input() -> None:
    raw: dict[str, Any] = {"api": {"listen": "127.0.0.1:1"}, "log": {"format": "json"}}
    data, origins = apply_env_overrides(raw, {"FLEETGATE_API__LISTEN": "0.0.0.0:2"})
    assert data == {"api": {"listen": "0.0.0.0:2"}, "log": {"format": "json"}}
    assert origins == {("api", "listen"): "FLEETGATE_API__LISTEN"}
    assert raw == {"api": {"listen": "127.0.0.1:1"}, "log": {"format": "json"}}


def test_env_can_create_a_listener() -> None:
    config = parse_config(
        "",
        {
            "FLEETGATE_LISTENERS__PLC__BIND": "0.0.0.0:5020",
            "FLEETGATE_LISTENERS__PLC__FORWARD_TO": "10.0.0.20:502",
            "FLEETGATE_LISTENERS__PLC__MAX_CONNECTIONS": "7",
        },
    )
    assert set(config.listeners) == {"plc"}
    assert config.listeners["plc"].bind == "0.0.0.0:5020"
    assert config.listeners["plc"].forward_to == "10.0.0.20:502"
    assert config.listeners["plc"].max_connections == 7


def test_env_merges_into_a_listener_from_the_file() -> None:
    config = parse_config(LISTENER, {"FLEETGATE_LISTENERS__PLC__BIND": "127.0.0.1:6000"})
    assert config.listeners["plc"].bind == "127.0.0.1:6000"
    assert config.listeners["plc"].forward_to == "10.0.0.20:502"


def test_env_errors_say_which_variable() -> None:
    detail = config_error("", {"FLEETGATE_LOG__FORMAT": "xml"})
    assert detail == (
        "config: log.format (from FLEETGATE_LOG__FORMAT): 'xml' is not allowed; choose json|console"
    )
    detail = config_error("", {"FLEETGATE_API__LISTN": "0.0.0.0:1"})
    assert detail.startswith("config: api.listn (from FLEETGATE_API__LISTN): unknown key; ")
    assert "valid keys here: drain_timeout_s, listen, max_body_bytes" in detail


def test_env_error_in_a_nested_listener_key_says_which_variable() -> None:
    detail = config_error(LISTENER, {"FLEETGATE_LISTENERS__PLC__BIND": "nowhere"})
    assert detail.startswith(
        "config: listeners.plc.bind (from FLEETGATE_LISTENERS__PLC__BIND): 'nowhere' is not"
    )


def test_env_without_nesting_separator_is_ignored() -> None:
    env = {
        "FLEETGATE_DATA": "/var/lib/fleetgate",
        "FLEETGATE_TOKEN": "fgt_abc",
        "FLEETGATE_MASTER_KEY": "not-a-key",
        "FLEETGATE_NODE_NAME": "not valid!",
        "OTHER_API__LISTEN": "nonsense",
        "fleetgate_api__listen": "nonsense",
    }
    assert parse_config("", env) == Config()


def test_env_empty_segment_is_an_error() -> None:
    detail = config_error("", {"FLEETGATE_API____LISTEN": "0.0.0.0:1"})
    assert "FLEETGATE_API____LISTEN: empty key segment" in detail


def test_env_below_a_non_table_is_an_error() -> None:
    detail = config_error('api = "x"\n', {"FLEETGATE_API__LISTEN": "0.0.0.0:1"})
    assert "FLEETGATE_API__LISTEN: api.listen is not inside a table" in detail


# --- the DSN is a secret, models are frozen -----------------------------------------------


def test_dsn_from_env_is_a_secret_that_never_prints() -> None:
    config = parse_config(
        "",
        {"FLEETGATE_STORE__BACKEND": "postgresql", "FLEETGATE_STORE__POSTGRESQL_DSN": DSN},
    )
    dsn = config.store.postgresql_dsn
    assert isinstance(dsn, Secret)
    assert dsn.reveal_text() == DSN
    for text in (repr(config), str(config), repr(config.store), f"{config.store}"):
        assert "hunter2" not in text
    assert "hunter2" not in repr(config.model_dump())


def test_dsn_from_file_is_a_secret() -> None:
    config = parse_config(f'[store]\nbackend = "postgresql"\npostgresql_dsn = "{DSN}"\n', {})
    assert config.store.postgresql_dsn == Secret(DSN)
    assert "hunter2" not in repr(config)


def test_errors_beside_a_dsn_do_not_show_it() -> None:
    detail = config_error(
        f'[store]\nbackend = "postgresql"\npostgresql_dsn = "{DSN}"\npostgresql_pool_max = 0\n'
    )
    assert "store.postgresql_pool_max" in detail
    assert "hunter2" not in detail


def test_config_models_are_frozen() -> None:
    config = parse_config(LISTENER, {})
    for model, attribute, value in [
        (config.node, "name", "other"),
        (config.api, "listen", "0.0.0.0:1"),
        (config.store, "backend", "postgresql"),
        (config.listeners["plc"], "bind", "0.0.0.0:1"),
    ]:
        with pytest.raises(ValidationError, match="frozen"):
            setattr(model, attribute, value)
    assert config.node.name == "fleetgate-1"
    assert config.api.listen == "127.0.0.1:8080"


# --- load_config --------------------------------------------------------------------------


def test_load_config_reads_the_file_and_env(tmp_path: Path) -> None:
    path = tmp_path / "fleetgate.toml"
    path.write_text('[node]\nname = "edge-7"\n[log]\nformat = "console"\n', encoding="utf-8")
    config = load_config(path, {"FLEETGATE_LOG__LEVEL": "debug"})
    assert config.node.name == "edge-7"
    assert config.log.format == "console"
    assert config.log.level == "debug"


def test_load_config_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "fleetgate.toml"
    path.write_text('[log]\nformat = "xml"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert info.value.detail.startswith(f"{path}: log.format: ")


def test_load_config_missing_file_says_how_to_create_it(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert info.value.detail == f"{path}: no such file; run `fleetgate serve` once to create it"


def test_load_config_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[node]\nname = "caf\xe9"\n')
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(path, {})
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path, {})


# --- split_host_port ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("localhost:80", ("localhost", 80)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("host:65535", ("host", 65535)),
        ("[::1]:8080", ("::1", 8080)),
        ("[2001:db8::1]:443", ("2001:db8::1", 443)),
        ("[::ffff:10.0.0.1]:1", ("::ffff:10.0.0.1", 1)),
    ],
)
def test_split_host_port(value: str, expected: tuple[str, int]) -> None:
    assert split_host_port(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("localhost", "is not HOST:PORT"),
        (":8080", "is not HOST:PORT"),
        ("", "is not HOST:PORT"),
        ("host:", "the port must be a number from 0 to 65535"),
        ("host:65536", "the port must be a number from 0 to 65535"),
        ("host:-1", "the port must be a number from 0 to 65535"),
        ("host:+80", "the port must be a number from 0 to 65535"),
        ("host: 80", "the port must be a number from 0 to 65535"),
        ("::1:8080", "write an IPv6 host in brackets"),
        ("[::1]", "write an IPv6 host in brackets"),
        ("[::1]:99999", "the port must be a number from 0 to 65535"),
    ],
)
def test_split_host_port_rejects(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        split_host_port(value)


@pytest.mark.parametrize("value", ["[nope]:80", "host:²"])
def test_split_host_port_errors_quote_the_value(value: str) -> None:
    # Every other rejection quotes the value and shows the right form; bracketed non-IPv6 hosts
    # and non-ASCII digits leak a bare ipaddress/int() message instead (see the report).
    with pytest.raises(ValueError, match=re.escape(repr(value))):
        split_host_port(value)


@given(host=st.ip_addresses(v=4), port=st.integers(min_value=0, max_value=65535))
def test_split_host_port_round_trips_ipv4(host: ipaddress.IPv4Address, port: int) -> None:
    assert split_host_port(f"{host}:{port}") == (str(host), port)


@given(host=st.ip_addresses(v=6), port=st.integers(min_value=0, max_value=65535))
def test_split_host_port_round_trips_bracketed_ipv6(host: ipaddress.IPv6Address, port: int) -> None:
    assert split_host_port(f"[{host}]:{port}") == (str(host), port)


@given(port=st.integers().filter(lambda p: not 0 <= p <= 65535))
def test_split_host_port_rejects_out_of_range_ports(port: int) -> None:
    with pytest.raises(ValueError, match="port"):
        split_host_port(f"127.0.0.1:{port}")
