"""check_routes: listener name -> destination name, spelled as the configuration spells them."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from fleetgate.config.schema import ListenerName
from fleetgate.errors import InvalidRequest
from fleetgate.records import MAX_ROUTES, ROUTE_NAME_RE, Device, DeviceStatus, check_routes


@pytest.mark.parametrize(
    "routes",
    [
        {},
        {"mqtt": "aws-iot"},
        {"a": "b"},
        {"plc_2": "site-a_broker", "x" * 63: "y" * 63},
        {f"l{n}": "dest" for n in range(MAX_ROUTES)},
    ],
)
def test_valid_routes_pass(routes: dict[str, str]) -> None:
    check_routes(routes)


@pytest.mark.parametrize(
    ("routes", "field"),
    [
        ({"Mqtt": "aws"}, "routes.Mqtt"),
        ({"1st": "aws"}, "routes.1st"),
        ({"_x": "aws"}, "routes._x"),
        ({"": "aws"}, "routes."),
        ({"x" * 64: "aws"}, "routes." + "x" * 64),
        ({"a.b": "aws"}, "routes.a.b"),
        ({"mqtt\n": "aws"}, "routes.mqtt\n"),
        ({"mqtt": "AWS"}, "routes.mqtt"),
        ({"mqtt": "-aws"}, "routes.mqtt"),
        ({"mqtt": ""}, "routes.mqtt"),
        ({"mqtt": "y" * 64}, "routes.mqtt"),
        ({"mqtt": "aws\n"}, "routes.mqtt"),
        ({"mqtt": "é"}, "routes.mqtt"),
        ({"mqtt": None}, "routes.mqtt"),
        ({"mqtt": 3}, "routes.mqtt"),
        ({"mqtt": ["aws"]}, "routes.mqtt"),
    ],
)
def test_invalid_routes_name_the_entry(routes: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequest, match="must be 1-63 lowercase") as info:
        check_routes(routes)
    assert info.value.field == field


def test_key_error_says_listener_and_value_error_says_destination() -> None:
    with pytest.raises(InvalidRequest, match=r"^listener name 'Bad'"):
        check_routes({"Bad": "ok"})
    with pytest.raises(InvalidRequest, match=r"^destination name 'Bad' for listener ok"):
        check_routes({"ok": "Bad"})


def test_more_than_max_routes_is_refused() -> None:
    with pytest.raises(InvalidRequest, match=f"at most {MAX_ROUTES} routes") as info:
        check_routes({f"l{n}": "dest" for n in range(MAX_ROUTES + 1)})
    assert info.value.field == "routes"


@pytest.mark.parametrize("routes", [None, [], ["mqtt"], "mqtt=aws", 1])
def test_not_a_mapping_is_refused(routes: object) -> None:
    with pytest.raises(InvalidRequest, match="must be an object") as info:
        check_routes(routes)
    assert info.value.field == "routes"


def test_field_name_prefixes_every_field() -> None:
    with pytest.raises(InvalidRequest) as whole:
        check_routes("no", "settings.routes")
    assert whole.value.field == "settings.routes"
    with pytest.raises(InvalidRequest) as entry:
        check_routes({"mqtt": "Nope"}, "settings.routes")
    assert entry.value.field == "settings.routes.mqtt"


def test_huge_names_are_truncated_in_the_message() -> None:
    with pytest.raises(InvalidRequest) as info:
        check_routes({"!" * 10_000: "x"})
    assert len(info.value.detail) < 400
    assert info.value.field is not None
    assert len(info.value.field) < 100


@pytest.mark.parametrize(
    "name", ["a", "mqtt", "plc_2", "site-a", "x" * 63, "x" * 64, "Mqtt", "1a", "a.b", "a\n", ""]
)
def test_route_names_agree_with_config_listener_names(name: str) -> None:
    """A route may name exactly what the configuration accepts as a listener name."""
    try:
        TypeAdapter(ListenerName).validate_python(name)
    except ValidationError:
        config_accepts = False
    else:
        config_accepts = True
    assert bool(ROUTE_NAME_RE.fullmatch(name)) is config_accepts


def test_device_routes_default_to_empty_and_keep_positional_construction() -> None:
    now = datetime(2025, 1, 1, tzinfo=UTC)
    device = Device("d", "d", "default", DeviceStatus.ENABLED, {}, (), now, now, 1)
    other = Device("e", "e", "default", DeviceStatus.ENABLED, {}, (), now, now, 1)
    assert device.routes == {}
    assert device.routes is not other.routes  # no shared mutable default
