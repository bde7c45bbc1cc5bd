"""Instants as integer microseconds, and the fake clock tests use."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetgate.clock import FakeClock, SystemClock, from_epoch_us, to_epoch_us

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@given(
    moment=st.datetimes(
        min_value=datetime(1970, 1, 1),
        max_value=datetime(9000, 12, 31, 23, 59, 59, 999_999),
        timezones=st.just(UTC),
    )
)
def test_epoch_us_round_trip(moment: datetime) -> None:
    us = to_epoch_us(moment)
    assert us == (moment - EPOCH) // timedelta(microseconds=1)
    back = from_epoch_us(us)
    assert back == moment
    assert back.tzinfo is UTC


@given(us=st.integers(min_value=-(10**15), max_value=10**17))
def test_epoch_us_round_trip_from_integers(us: int) -> None:
    assert to_epoch_us(from_epoch_us(us)) == us


def test_epoch_us_known_values() -> None:
    assert to_epoch_us(EPOCH) == 0
    assert to_epoch_us(datetime(1970, 1, 1, 0, 0, 1, 5, tzinfo=UTC)) == 1_000_005
    assert to_epoch_us(datetime(1969, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)) == -1
    assert from_epoch_us(1_767_225_600_000_000) == datetime(2026, 1, 1, tzinfo=UTC)


def test_epoch_us_respects_other_offsets() -> None:
    plus_two = timezone(timedelta(hours=2))
    moment = datetime(2026, 1, 1, 2, 0, tzinfo=plus_two)
    assert to_epoch_us(moment) == to_epoch_us(datetime(2026, 1, 1, tzinfo=UTC))
    assert from_epoch_us(to_epoch_us(moment)) == moment


def test_epoch_us_refuses_naive_datetimes() -> None:
    with pytest.raises(TypeError):
        to_epoch_us(datetime(2026, 1, 1))


def test_fake_clock_moves_only_when_told() -> None:
    clock = FakeClock()
    start = clock.now()
    assert start == datetime(2026, 1, 1, tzinfo=UTC)
    assert clock.now() == start
    assert clock.monotonic() == 0.0
    clock.advance(90.5)
    assert clock.now() == start + timedelta(seconds=90.5)
    assert clock.monotonic() == 90.5
    clock.advance(0.25)
    assert clock.monotonic() == 90.75
    assert clock.now() - start == timedelta(seconds=90.75)


def test_fake_clock_custom_start() -> None:
    start = datetime(2030, 6, 1, 12, tzinfo=UTC)
    clock = FakeClock(start)
    assert clock.now() == start
    clock.advance(3600)
    assert clock.now() == datetime(2030, 6, 1, 13, tzinfo=UTC)


def test_system_clock_is_aware_utc() -> None:
    clock = SystemClock()
    assert clock.now().tzinfo is UTC
    first = clock.monotonic()
    assert clock.monotonic() >= first
