"""Tables for people, JSON for scripts."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import click

Column = tuple[str, Callable[[dict[str, Any]], Any]]


def emit_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "-"
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "-"
    return str(value)


def emit_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> None:
    header = [name for name, _ in columns]
    body = [[_cell(get(row)) for _, get in columns] for row in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)
    ]
    click.echo("  ".join(h.upper().ljust(w) for h, w in zip(header, widths, strict=True)).rstrip())
    for r in body:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def emit_record(record: dict[str, Any], fields: Sequence[str]) -> None:
    width = max(len(f) for f in fields)
    for field in fields:
        click.echo(f"{field.ljust(width)}  {_cell(record.get(field))}")


def emit(
    value: Any,
    as_json: bool,
    *,
    columns: Sequence[Column] | None = None,
    fields: Sequence[str] = (),
) -> None:
    if as_json:
        emit_json(value)
    elif columns is not None:
        emit_table(value["items"] if isinstance(value, dict) else value, columns)
        if isinstance(value, dict) and value.get("next_cursor"):
            click.echo(f"(more: --cursor {value['next_cursor']} or --all)")
    else:
        emit_record(value, fields)


def key_values(pairs: Sequence[str], option: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint=option)
        out[key] = value
    return out


def parse_duration_s(text: str) -> int:
    """``90s``, ``15m``, ``12h``, ``30d`` -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = text[:-1], text[-1:]
    if unit not in units or not (number.isascii() and number.isdigit()) or int(number) <= 0:
        raise click.BadParameter(f"{text!r}: use a positive number with s, m, h or d, like 30d")
    return int(number) * units[unit]
