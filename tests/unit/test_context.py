"""Pagination cursors and page limits."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetgate.errors import InvalidRequest
from fleetgate.services.context import (
    DEFAULT_PAGE,
    MAX_PAGE,
    SYSTEM_CALLER,
    check_limit,
    decode_cursor,
    encode_cursor,
)


@given(value=st.text(min_size=1))
def test_cursor_round_trip(value: str) -> None:
    cursor = encode_cursor(value)
    assert "=" not in cursor
    assert cursor.isascii()
    assert decode_cursor(cursor) == value


def test_cursor_is_url_safe() -> None:
    cursor = encode_cursor("\xfb\xff>?" * 10)
    assert set(cursor) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def test_no_cursor() -> None:
    assert decode_cursor(None) is None
    assert decode_cursor("") is None
    # An empty value encodes to the empty cursor, which means "from the start".
    assert encode_cursor("") == ""


@pytest.mark.parametrize("cursor", ["a", "abcde", "_w", "/w==", "////"])
def test_undecodable_cursor_is_invalid(cursor: str) -> None:
    with pytest.raises(InvalidRequest, match="cursor is not one this API returned") as info:
        decode_cursor(cursor)
    assert info.value.field == "cursor"


@pytest.mark.parametrize("cursor", ["!!!!", "cGxjLTE=.."])
def test_cursor_with_foreign_characters_is_invalid(cursor: str) -> None:
    # The base64 decoder drops characters outside its alphabet instead of failing: "!!!!"
    # decodes to "" (the first page again) and "cGxjLTE=.." to "plc-1", instead of an error.
    with pytest.raises(InvalidRequest) as info:
        decode_cursor(cursor)
    assert info.value.field == "cursor"


@pytest.mark.parametrize("limit", [1, DEFAULT_PAGE, MAX_PAGE])
def test_limit_in_range(limit: int) -> None:
    assert check_limit(limit) == limit


@pytest.mark.parametrize("limit", [0, -1, MAX_PAGE + 1, 10**9])
def test_limit_out_of_range(limit: int) -> None:
    with pytest.raises(InvalidRequest, match="limit must be between 1 and 500") as info:
        check_limit(limit)
    assert info.value.field == "limit"


def test_system_caller() -> None:
    assert SYSTEM_CALLER.principal.token_id == "system"
    assert SYSTEM_CALLER.request_id is None
    assert SYSTEM_CALLER.source is None
