"""Bound log context: what ``bind`` adds reaches every record made inside it, in this task
only, and is gone when the block ends, however it ends."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator

import pytest

from fleetgate.logs import JsonFormatter, bind, get_logger


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter())
        self.lines: list[dict[str, object]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


@pytest.fixture
def lines() -> Iterator[list[dict[str, object]]]:
    handler = _Lines()
    logger = logging.getLogger("fleetgate.test_logs")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler.lines
    logger.removeHandler(handler)


def _fields(line: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in line.items() if k not in ("ts", "level", "event", "logger")}


def test_nested_binds_merge_and_unwind_even_on_an_exception(lines: list[dict[str, object]]) -> None:
    log = get_logger("fleetgate.test_logs")

    def fails() -> None:
        with bind(device="dev-1", conn="mqtt-1b"):
            log.info("inner", extra="x")
            raise ValueError("boom")

    with bind(listener="mqtt", conn="mqtt-1"):
        with pytest.raises(ValueError, match="boom"):
            fails()
        log.info("outer")
    log.info("after")
    assert [_fields(line) for line in lines] == [
        {"listener": "mqtt", "conn": "mqtt-1b", "device": "dev-1", "extra": "x"},
        {"listener": "mqtt", "conn": "mqtt-1"},
        {},
    ]


async def test_each_task_sees_only_its_own_binds(lines: list[dict[str, object]]) -> None:
    log = get_logger("fleetgate.test_logs")
    both_bound = asyncio.Barrier(2)

    async def connection(device: str) -> None:
        with bind(device=device):
            await both_bound.wait()  # the other task's bind is in force now too
            log.info("relayed")

    await asyncio.gather(connection("dev-a"), connection("dev-b"))
    assert sorted(str(line["device"]) for line in lines) == ["dev-a", "dev-b"]
