"""The ``?`` to ``$n`` placeholder translation for PostgreSQL."""

from __future__ import annotations

import pytest

from fleetgate.store.database import to_dollar_placeholders


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT 1", "SELECT 1"),
        ("", ""),
        ("SELECT * FROM t WHERE id = ?", "SELECT * FROM t WHERE id = $1"),
        ("INSERT INTO t (a, b, c) VALUES (?, ?, ?)", "INSERT INTO t (a, b, c) VALUES ($1, $2, $3)"),
        ("??", "$1$2"),
        ("? AND ?", "$1 AND $2"),
    ],
)
def test_to_dollar_placeholders(sql: str, expected: str) -> None:
    assert to_dollar_placeholders(sql) == expected


def test_many_placeholders_are_numbered_in_order() -> None:
    sql = ", ".join("?" for _ in range(12))
    assert to_dollar_placeholders(sql) == ", ".join(f"${i}" for i in range(1, 13))
