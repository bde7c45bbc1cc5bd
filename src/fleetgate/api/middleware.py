"""Per-request plumbing as plain ASGI: request id, body cap, access log, metrics."""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fleetgate.errors import PROBLEM_TYPE_PREFIX
from fleetgate.logs import bind, clip, get_logger
from fleetgate.metrics import Metrics

log = get_logger("fleetgate.api")
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Methods named in the metrics as themselves; any other token a client sends counts as "other"
# (a label per invented method would grow the series without bound, unauthenticated).
_KNOWN_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE"})


class BodyTooLarge(Exception):
    pass


class RequestContext:
    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        max_body_bytes: int,
        after_write: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        # Run before a write's answer goes out: this process's data path sees the change
        # before the caller is told it happened.
        self.after_write = after_write

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        offered = headers.get("x-request-id", "")
        request_id = offered if _REQUEST_ID_RE.fullmatch(offered) else secrets.token_hex(8)
        scope.setdefault("state", {})["request_id"] = request_id
        client = scope.get("client")
        source = client[0] if client else None
        method = scope["method"]
        status = 500
        started = time.perf_counter()

        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._too_large(send, request_id)
            status = 413
            self._record(scope, method, status, started, request_id, source)
            return

        seen = 0

        async def capped_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise BodyTooLarge
            return message

        async def tagged_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                if self.after_write is not None and method not in _SAFE_METHODS and status < 400:
                    await self.after_write()
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode()),
                ]
            await send(message)

        with bind(request_id=request_id):
            try:
                await self.app(scope, capped_receive, tagged_send)
            except BodyTooLarge:
                await self._too_large(send, request_id)
                status = 413
            finally:
                self._record(scope, method, status, started, request_id, source)

    def _record(
        self, scope: Scope, method: str, status: int, started: float, request_id: str, source: Any
    ) -> None:
        elapsed = time.perf_counter() - started
        route = scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        named = method if method in _KNOWN_METHODS else "other"
        self.metrics.http_requests.labels(named, template, str(status)).inc()
        self.metrics.http_duration.labels(named, template).observe(elapsed)
        if template not in ("/healthz", "/readyz", "/metrics"):
            log.info(
                "api.request",
                request_id=request_id,
                method=clip(method),
                path=clip(scope.get("path", "")),
                route=template,
                status=status,
                duration_ms=round(elapsed * 1000, 2),
                source=source,
            )

    async def _too_large(self, send: Send, request_id: str) -> None:
        body = (
            '{"type":"' + PROBLEM_TYPE_PREFIX + 'body-too-large","title":"Request body too large",'
            f'"status":413,"detail":"request bodies are limited to {self.max_body_bytes} bytes",'
            f'"request_id":"{request_id}"}}'
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/problem+json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"x-request-id", request_id.encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
