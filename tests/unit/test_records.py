"""Validation of the values the registry keeps."""

from __future__ import annotations

import pytest

from fleetgate.errors import InvalidRequest
from fleetgate.records import (
    MAX_ADDRESSES,
    MAX_ATTRIBUTE_VALUE_CHARS,
    MAX_ATTRIBUTES,
    check_attributes,
    check_device_id,
    check_group_name,
    normalize_address,
    normalize_addresses,
)


@pytest.mark.parametrize("value", ["a", "0", "plc-17", "site.a:unit_3", "A" * 128, "imei:35-1234"])
def test_valid_device_ids(value: str) -> None:
    assert check_device_id(value) == value


@pytest.mark.parametrize(
    "value", ["", "-a", ".a", "_a", "A" * 129, "a b", "a/b", "a\n", "é", "a\x00"]
)
def test_invalid_device_ids(value: str) -> None:
    with pytest.raises(InvalidRequest, match="must be 1-128 characters") as info:
        check_device_id(value)
    assert info.value.field == "id"


def test_device_id_error_truncates_huge_input() -> None:
    with pytest.raises(InvalidRequest) as info:
        check_device_id("!" * 10_000)
    assert len(info.value.detail) < 400


@pytest.mark.parametrize("value", ["default", "a", "plant-a", "0.b_c", "x" * 63])
def test_valid_group_names(value: str) -> None:
    assert check_group_name(value) == value


@pytest.mark.parametrize("value", ["", "Plant", "-a", "x" * 64, "a b", "a:b", "a\n"])
def test_invalid_group_names(value: str) -> None:
    with pytest.raises(InvalidRequest, match="group name") as info:
        check_group_name(value)
    assert info.value.field == "group"
    with pytest.raises(InvalidRequest) as info:
        check_group_name(value, "groups[2]")
    assert info.value.field == "groups[2]"


def test_valid_attributes() -> None:
    check_attributes({})
    check_attributes({"imei": "3512", "a" * 63: "x" * MAX_ATTRIBUTE_VALUE_CHARS, "k_2": ""})
    check_attributes({f"k{i}": "v" for i in range(MAX_ATTRIBUTES)})


@pytest.mark.parametrize("key", ["Imei", "1abc", "_a", "a-b", "a" * 64, ""])
def test_invalid_attribute_keys(key: str) -> None:
    with pytest.raises(InvalidRequest, match="attribute key") as info:
        check_attributes({"ok": "v", key: "v"})
    assert info.value.field == f"attributes.{key}"


def test_attribute_value_too_long() -> None:
    with pytest.raises(InvalidRequest, match="at most 256 characters") as info:
        check_attributes({"serial": "x" * (MAX_ATTRIBUTE_VALUE_CHARS + 1)}, "set")
    assert info.value.field == "set.serial"


def test_attribute_value_must_be_text() -> None:
    with pytest.raises(InvalidRequest) as info:
        check_attributes({"serial": 5})  # type: ignore[dict-item]
    assert info.value.field == "attributes.serial"


def test_too_many_attributes() -> None:
    with pytest.raises(InvalidRequest, match="at most 64 attributes") as info:
        check_attributes({f"k{i}": "v" for i in range(MAX_ATTRIBUTES + 1)})
    assert info.value.field == "attributes"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("10.0.0.1", "10.0.0.1"),
        (" 10.0.0.1 ", "10.0.0.1"),
        ("::ffff:10.0.0.1", "10.0.0.1"),
        ("::FFFF:192.168.1.20", "192.168.1.20"),
        ("2001:DB8:0:0:0:0:0:1", "2001:db8::1"),
        ("::1", "::1"),
        ("::10.0.0.1", "::a00:1"),
    ],
)
def test_normalize_address(value: str, expected: str) -> None:
    assert normalize_address(value) == expected


@pytest.mark.parametrize(
    "value", ["", "10.0.0.256", "10.0.0", "host.example", "10.0.0.1/24", "10.0.0.1:80", "::g"]
)
def test_bad_address_is_rejected(value: str) -> None:
    with pytest.raises(InvalidRequest, match="is not an IPv4 or IPv6 address") as info:
        normalize_address(value)
    assert info.value.field == "addresses"
    with pytest.raises(InvalidRequest) as info:
        normalize_address(value, "source")
    assert info.value.field == "source"


def test_normalize_addresses_dedups_and_sorts() -> None:
    result = normalize_addresses(["10.0.0.2", "::ffff:10.0.0.1", "10.0.0.1", "2001:db8::1"])
    assert result == ("10.0.0.1", "10.0.0.2", "2001:db8::1")
    assert normalize_addresses([]) == ()


def test_address_count_is_capped() -> None:
    many = [f"10.0.0.{i}" for i in range(MAX_ADDRESSES)]
    assert len(normalize_addresses(many)) == MAX_ADDRESSES
    with pytest.raises(InvalidRequest, match="at most 16 addresses") as info:
        normalize_addresses([*many, "10.0.1.1"])
    assert info.value.field == "addresses"
