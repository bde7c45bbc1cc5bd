"""Talking to the API: base URL and token resolution, and errors mapped to exit codes."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from fleetgate.errors import EXIT_UNREACHABLE, PROBLEM_TYPE_PREFIX, kind_for_slug

if TYPE_CHECKING:
    import httpx

DEFAULT_URL = "http://127.0.0.1:8080"
CLI_CONFIG_ENV = "FLEETGATE_CLI_CONFIG"


class CliFailure(click.ClickException):
    """An error with the exit code from fleetgate.errors' table."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code  # type: ignore[misc]  # click reads it per instance

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.message}", err=True)


def cli_config_path() -> Path:
    explicit = os.environ.get(CLI_CONFIG_ENV)
    if explicit:
        return Path(explicit)
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "fleetgate" / "cli.toml"


def _file_settings() -> dict[str, Any]:
    path = cli_config_path()
    if not path.exists():
        if os.environ.get(CLI_CONFIG_ENV):
            raise CliFailure(f"{CLI_CONFIG_ENV} names {path}, which does not exist", 78)
        return {}
    if path.stat().st_mode & 0o077:
        click.echo(
            f"warning: {path} can be read by others and may hold a token; chmod 600 {path}",
            err=True,
        )
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise CliFailure(f"{path}: {exc}", 78) from None
    unknown = set(data) - {"url", "token"}
    if unknown:
        raise CliFailure(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; use url, token", 78)
    return data


@dataclass
class ApiClient:
    url: str
    token: str | None
    timeout_s: float = 30.0

    @classmethod
    def resolve(cls, url: str | None, token: str | None) -> ApiClient:
        """Flag, then environment, then the CLI config file, then the default."""
        settings: dict[str, Any] | None = None

        def from_file(key: str) -> str | None:
            nonlocal settings
            if settings is None:
                settings = _file_settings()
            value = settings.get(key)
            return str(value) if value is not None else None

        resolved_url = url or os.environ.get("FLEETGATE_URL") or from_file("url") or DEFAULT_URL
        resolved_token = token or os.environ.get("FLEETGATE_TOKEN") or from_file("token")
        return cls(url=resolved_url.rstrip("/"), token=resolved_token)

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: list[tuple[str, str]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        response = self._send(method, path, json=json, params=params, headers=headers)
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

    def request_bytes(self, method: str, path: str, *, json: Any = None) -> bytes:
        return self._send(method, path, json=json, params=None, headers=None).content

    def _send(
        self,
        method: str,
        path: str,
        *,
        json: Any,
        params: list[tuple[str, str]] | None,
        headers: dict[str, str] | None,
    ) -> httpx.Response:
        import httpx  # about a third of the CLI's start-up: only commands that call the API pay

        sent = dict(headers or {})
        if self.token:
            sent["Authorization"] = f"Bearer {self.token}"
        try:
            response = httpx.request(
                method,
                self.url + path,
                json=json,
                params=tuple(params or ()),
                headers=sent,
                timeout=self.timeout_s,
            )
        except httpx.HTTPError as exc:
            raise CliFailure(
                f"cannot reach the fleetgate API at {self.url}: {exc}; is `fleetgate serve` "
                "running? (set --url or FLEETGATE_URL)",
                EXIT_UNREACHABLE,
            ) from None
        if response.status_code >= 400:
            raise _failure(response)
        return response


def _failure(response: httpx.Response) -> CliFailure:
    try:
        problem = response.json()
    except ValueError:
        problem = {}
    if not isinstance(problem, dict):
        problem = {}
    slug = str(problem.get("type", "")).removeprefix(PROBLEM_TYPE_PREFIX)
    kind = kind_for_slug(slug)
    detail = problem.get("detail") or response.reason_phrase
    message = f"{response.status_code} {problem.get('title', response.reason_phrase)}: {detail}"
    if response.status_code == 401:
        message += " (set FLEETGATE_TOKEN or --token)"
    return CliFailure(message, kind.exit_code)
