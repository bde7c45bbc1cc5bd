"""CLI output helpers: durations, KEY=VALUE options, aligned tables."""

from __future__ import annotations

import json
from typing import Any

import click
import pytest

from fleetgate.cli.output import (
    Column,
    emit,
    emit_json,
    emit_record,
    emit_table,
    key_values,
    parse_duration_s,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("15m", 900), ("12h", 43_200), ("30d", 2_592_000), ("1s", 1), ("007m", 420)],
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration_s(text) == seconds


@pytest.mark.parametrize(
    "text", ["", "s", "30", "0d", "-1d", "1.5h", "1w", "10 s", " 10s", "1D", "d30", "+5m"]
)
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(click.BadParameter, match="use a positive number with s, m, h or d"):
        parse_duration_s(text)


def test_parse_duration_rejects_non_ascii_digits_as_bad_parameter() -> None:
    # "²".isdigit() is True but int("²") raises ValueError: the CLI would crash with a traceback
    # instead of printing a usage error.
    with pytest.raises(click.BadParameter):
        parse_duration_s("²d")


def test_key_values() -> None:
    assert key_values([], "--attr") == {}
    assert key_values(["a=1", "b=", "c=x=y", "a=2"], "--attr") == {"a": "2", "b": "", "c": "x=y"}


@pytest.mark.parametrize("pair", ["novalue", "=v", ""])
def test_key_values_rejects(pair: str) -> None:
    with pytest.raises(click.BadParameter, match="is not KEY=VALUE") as info:
        key_values(["ok=1", pair], "--attr")
    assert info.value.param_hint == "--attr"
    assert repr(pair) in info.value.message


COLUMNS: list[Column] = [
    ("id", lambda r: r["id"]),
    ("group", lambda r: r.get("group")),
    ("attributes", lambda r: r.get("attributes")),
]


def test_emit_table_aligns_columns(capsys: pytest.CaptureFixture[str]) -> None:
    rows: list[dict[str, Any]] = [
        {"id": "plc-1", "group": "default", "attributes": {"imei": "35", "site": "a"}},
        {"id": "a-much-longer-id", "group": None, "attributes": {}},
        {"id": "x", "group": "g", "attributes": ["p", "q"]},
    ]
    emit_table(rows, COLUMNS)
    assert capsys.readouterr().out.splitlines() == [
        "ID                GROUP    ATTRIBUTES",
        "plc-1             default  imei=35,site=a",
        "a-much-longer-id  -        -",
        "x                 g        p,q",
    ]


def test_emit_table_without_rows_prints_the_header(capsys: pytest.CaptureFixture[str]) -> None:
    emit_table([], COLUMNS)
    assert capsys.readouterr().out == "ID  GROUP  ATTRIBUTES\n"


def test_emit_table_header_wider_than_cells(capsys: pytest.CaptureFixture[str]) -> None:
    emit_table([{"id": 1, "group": "g", "attributes": []}], COLUMNS)
    assert capsys.readouterr().out.splitlines() == [
        "ID  GROUP  ATTRIBUTES",
        "1   g      -",
    ]


def test_emit_record(capsys: pytest.CaptureFixture[str]) -> None:
    emit_record({"id": "plc-1", "addresses": ["10.0.0.1", "10.0.0.2"]}, ["id", "addresses", "x"])
    assert capsys.readouterr().out.splitlines() == [
        "id         plc-1",
        "addresses  10.0.0.1,10.0.0.2",
        "x          -",
    ]


def test_emit_json_is_sorted_and_keeps_unicode(capsys: pytest.CaptureFixture[str]) -> None:
    emit_json({"b": 1, "a": "café"})
    out = capsys.readouterr().out
    assert json.loads(out) == {"a": "café", "b": 1}
    assert out.index('"a"') < out.index('"b"')
    assert "café" in out


def test_emit_page_mentions_the_next_cursor(capsys: pytest.CaptureFixture[str]) -> None:
    emit({"items": [{"id": "a"}], "next_cursor": "YQ"}, False, columns=COLUMNS[:1])
    assert capsys.readouterr().out.splitlines() == ["ID", "a", "(more: --cursor YQ or --all)"]
    emit({"items": [{"id": "a"}], "next_cursor": None}, False, columns=COLUMNS[:1])
    assert capsys.readouterr().out.splitlines() == ["ID", "a"]
    emit({"id": "a"}, True, columns=COLUMNS[:1])
    assert json.loads(capsys.readouterr().out) == {"id": "a"}
