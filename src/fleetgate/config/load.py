"""Reading the TOML file and the environment into a :class:`Config`, or a key-path error."""

from __future__ import annotations

import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from fleetgate.config.schema import Config
from fleetgate.errors import ConfigError

ENV_PREFIX = "FLEETGATE_"
ENV_NESTING = "__"


def _env_value(text: str) -> Any:
    """An override is text, which the schema converts (``10`` to a number where one is wanted);
    a TOML array or inline table (``["a", "b"]``, ``{k = 1}``) is parsed as one."""
    if text.lstrip().startswith(("[", "{")):
        try:
            return tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            return text
    return text


def apply_env_overrides(
    raw: dict[str, Any], env: Mapping[str, str]
) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    """``FLEETGATE_API__LISTEN=…`` sets ``api.listen``; returns the data and each key's origin."""
    data: dict[str, Any] = {k: v for k, v in raw.items()}
    origins: dict[tuple[str, ...], str] = {}
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX) or ENV_NESTING not in name:
            continue
        path = tuple(p.lower() for p in name[len(ENV_PREFIX) :].split(ENV_NESTING))
        if any(not p for p in path):
            raise ConfigError(f"{name}: empty key segment; write FLEETGATE_SECTION__KEY=value")
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {} if child is None else child
                if not isinstance(child, dict):
                    raise ConfigError(f"{name}: {'.'.join(path)} is not inside a table")
            node[part] = dict(child)
            node = node[part]
        node[path[-1]] = _env_value(env[name])
        origins[path] = name
    return data, origins


def _model_at(loc: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The model that owns the last element of ``loc`` (to list its valid keys)."""
    current: Any = Config
    for part in loc[:-1]:
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                return None
            current = field.annotation
        elif typing.get_origin(current) is dict:
            current = typing.get_args(current)[1]
        else:
            return None
        while typing.get_origin(current) in (typing.Union, types.UnionType, typing.Annotated):
            args = [a for a in typing.get_args(current) if a is not type(None)]
            current = args[0]
    if isinstance(current, type) and issubclass(current, BaseModel):
        return current
    return None


def _describe(error: Mapping[str, Any]) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind == "extra_forbidden":
        model = _model_at(tuple(error["loc"]))
        valid = ", ".join(sorted(model.model_fields)) if model else "see docs/configuration.md"
        return f"unknown key; valid keys here: {valid}"
    if kind == "missing":
        return "required key is missing; add it"
    if kind == "literal_error":
        expected = str(ctx.get("expected", "")).replace("'", "").replace(" or ", "|")
        return f"{error.get('input')!r} is not allowed; choose {expected.replace(', ', '|')}"
    if kind == "string_pattern_mismatch":
        return f"{error.get('input')!r} does not match {ctx.get('pattern')}"
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{message} (got {error.get('input')!r})" if kind.endswith("_type") else message


def _format(exc: ValidationError, origins: Mapping[tuple[str, ...], str], source: str) -> str:
    lines = []
    for error in exc.errors():
        loc = tuple(str(p) for p in error["loc"])
        path = ".".join(loc) or "(top level)"
        origin = origins.get(loc)
        where = f" (from {origin})" if origin else ""
        lines.append(f"{path}{where}: {_describe(error)}")
    return (
        f"{source}: " + "; ".join(lines)
        if len(lines) == 1
        else (f"{source}: {len(lines)} problems:\n  " + "\n  ".join(lines))
    )


def parse_config(text: str, env: Mapping[str, str], source: str = "config") -> Config:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    data, origins = apply_env_overrides(raw, env)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format(exc, origins, source)) from None


def load_config(path: Path, env: Mapping[str, str]) -> Config:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no such file; run `fleetgate serve` once to create it"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    return parse_config(text, env, source=str(path))


def default_config_text() -> str:
    return (Path(__file__).parent / "default.toml").read_text(encoding="utf-8")
