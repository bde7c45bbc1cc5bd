"""Every error leaves the API as RFC 9457 problem+json, from the table in fleetgate.errors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from fleetgate.errors import (
    PROBLEM_TYPE_PREFIX,
    FleetgateError,
    InvalidRequest,
    MalformedBody,
)
from fleetgate.logs import get_logger

log = get_logger("fleetgate.api")
PROBLEM_JSON = "application/problem+json"


def problem_response(
    status: int,
    slug: str,
    title: str,
    detail: str,
    request: Request,
    *,
    errors: Sequence[dict[str, str]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE_PREFIX + slug,
        "title": title,
        "status": status,
        "detail": detail,
        "instance": request.url.path,
    }
    request_id = getattr(request.state, "request_id", None)
    if request_id:
        body["request_id"] = request_id
    if errors:
        body["errors"] = list(errors)
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def error_response(exc: FleetgateError, request: Request) -> JSONResponse:
    kind = exc.kind
    errors = [{"field": exc.field, "message": exc.detail}] if exc.field else None
    headers = {"WWW-Authenticate": 'Bearer realm="fleetgate"'} if kind.http_status == 401 else None
    return problem_response(
        kind.http_status, kind.slug, kind.title, exc.detail, request, errors=errors, headers=headers
    )


def _field(loc: Sequence[Any]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        where, rest = parts[0], parts[1:]
        return ".".join(rest) if where == "body" and rest else ".".join([where, *rest])
    return ".".join(parts)


def _message(error: dict[str, Any]) -> str:
    kind = error.get("type", "")
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "missing":
        return "required field is missing"
    return str(error.get("msg", "invalid value")).removeprefix("Value error, ")


def validation_response(exc: RequestValidationError, request: Request) -> JSONResponse:
    raw = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in raw):
        kind = MalformedBody.kind
        error = next(e for e in raw if e.get("type") == "json_invalid")
        detail = f"body is not valid JSON: {error.get('ctx', {}).get('error', 'parse error')}"
        return problem_response(kind.http_status, kind.slug, kind.title, detail, request)
    errors = [{"field": _field(e.get("loc", ())), "message": _message(e)} for e in raw]
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    kind = InvalidRequest.kind
    return problem_response(kind.http_status, kind.slug, kind.title, detail, request, errors=errors)


def install(app: FastAPI) -> None:
    async def on_fleetgate_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, FleetgateError)
        if exc.kind.http_status >= 500:
            log.error("api.error", error=type(exc).__name__, detail=exc.detail)
        return error_response(exc, request)

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return validation_response(exc, request)

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        slug = {404: "not-found", 405: "method-not-allowed", 413: "body-too-large"}.get(
            exc.status_code, "http-error"
        )
        return problem_response(
            exc.status_code,
            slug,
            str(exc.detail),
            str(exc.detail),
            request,
            headers=dict(exc.headers) if exc.headers else None,
        )

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("api.unhandled_exception", error=type(exc).__name__, detail=str(exc))
        return problem_response(
            500, "internal", "Internal error", "the gateway failed; see its log", request
        )

    app.add_exception_handler(FleetgateError, on_fleetgate_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
