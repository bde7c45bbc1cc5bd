"""Structured logs: stable event names, context bound once, peer strings truncated.

``log.info("api.request", status=200)`` emits one record. Context (request id, connection id) is
bound with :func:`bind` for the current task and added to every record made inside it. The
formatter writes one JSON object per line, or a ``key=value`` line for people.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, Literal

MAX_VALUE_CHARS = 200

_context: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("fleetgate_log_context")


def _current_context() -> dict[str, Any]:
    return _context.get({})


_NOTHING: dict[str, Any] = {}


class bind:  # used as a function: ``with bind(device=...)``
    """Add fields to every record logged by this task until the block ends.

    A small object, not a generator: a relayed connection holds two for its whole life (the
    listener's and the device's), and a generator-based context manager costs about 0.4 KiB
    each with its suspended frame."""

    __slots__ = ("_fields", "_token")

    def __init__(self, **fields: Any) -> None:
        self._fields = fields
        self._token: contextvars.Token[dict[str, Any]] | None = None

    def __enter__(self) -> None:
        fields, self._fields = self._fields, _NOTHING  # in the context now: not kept twice
        self._token = _context.set({**_current_context(), **fields})

    def __exit__(self, *_: object) -> None:
        if self._token is not None:
            _context.reset(self._token)
            self._token = None


def clip(value: str, limit: int = MAX_VALUE_CHARS) -> str:
    """Truncate a peer-controlled string before it reaches a log line."""
    return value if len(value) <= limit else value[:limit] + "…"


class EventLogger:
    """A thin face over :mod:`logging` whose first argument is an event name."""

    def __init__(self, name: str) -> None:
        self._logger = logging.getLogger(name)

    def _emit(self, level: int, event: str, fields: dict[str, Any]) -> None:
        if self._logger.isEnabledFor(level):
            self._logger.log(level, event, extra={"fg_fields": fields}, stacklevel=3)

    def debug(self, event: str, **fields: Any) -> None:
        self._emit(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._emit(logging.INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._emit(logging.WARNING, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._emit(logging.ERROR, event, fields)


def get_logger(name: str) -> EventLogger:
    return EventLogger(name)


def _record_fields(record: logging.LogRecord) -> dict[str, Any]:
    fields: dict[str, Any] = dict(_current_context())
    fields.update(getattr(record, "fg_fields", {}))
    return fields


def _jsonable(value: Any) -> Any:
    if isinstance(value, str):
        return clip(value, 2000)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return clip(str(value), 2000)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
            "logger": record.name,
        }
        for key, value in _record_fields(record).items():
            out.setdefault(key, _jsonable(value))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC).strftime("%H:%M:%S")
        parts = [ts, f"{record.levelname.lower():7}", record.getMessage()]
        for key, value in _record_fields(record).items():
            text = json.dumps(_jsonable(value), ensure_ascii=False)
            parts.append(f"{key}={text}")
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


LogFormat = Literal["json", "console"]
LogLevel = Literal["debug", "info", "warning", "error"]


def configure(fmt: LogFormat, level: LogLevel) -> None:
    """Install the formatter on the root logger; safe to call again on reload."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else ConsoleFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # uvicorn's own access log duplicates ours; its error log is kept at warning and above.
    logging.getLogger("uvicorn.access").disabled = True
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
