"""Unauthenticated operational endpoints: liveness, readiness, metrics."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from fleetgate.api.deps import ServicesDep
from fleetgate.errors import FleetgateError
from fleetgate.health import Health
from fleetgate.metrics import Metrics
from fleetgate.metrics_share import merged
from fleetgate.services.lifecycle import ItemKind

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive and its event loop answers."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "Not ready; the body says why"}})
async def readyz(request: Request, svc: ServicesDep) -> JSONResponse:
    """Ready when the store answers, every listener is bound and the node is not draining."""
    health: Health = request.app.state.health
    checks: dict[str, Any] = {}
    ready = True
    try:
        await svc.db.ping()
        checks["store"] = "ok"
    except FleetgateError as exc:
        checks["store"] = exc.detail
        ready = False
    checks["listeners"] = dict(health.listeners)  # every listener, bound or why not
    if health.listener_problems():
        ready = False
    if health.draining:
        checks["draining"] = True
        ready = False
    return JSONResponse(
        {"status": "ready" if ready else "not ready", "checks": checks},
        status_code=200 if ready else 503,
    )


@router.get("/metrics", response_class=Response)
async def metrics(request: Request, svc: ServicesDep) -> Response:
    """Prometheus text exposition."""
    instruments: Metrics = request.app.state.metrics
    try:
        counts = await svc.devices.counts()
        # Most of a fleet's certificates renew by themselves on time: counted in the store,
        # never loaded (a scrape would otherwise read every certificate, 0.4 s per 10,000).
        on_time = await svc.lifecycle.renewing_on_time()
        inventory = await svc.lifecycle.inventory(without_renewing_on_time=True)
        instruments.store_up.set(1)
        for state in ("enabled", "disabled"):
            instruments.devices.labels(state).set(counts.get(state, 0))
        # Rebuilt on every scrape, so a renewed or revoked certificate's series disappears.
        # Device certificates fleetgate renews by itself, on time, are counted, not listed: a
        # series each (renamed at every renewal) would grow with the fleet.
        instruments.not_after.clear()
        overdue = 0
        for item in inventory:
            if item.renews_automatically and item.kind is ItemKind.CERTIFICATE:
                overdue += 1  # (those on time were left out)
            instruments.not_after.labels(
                item.kind.value,
                item.id,
                item.subject[:200],
                item.device_id or "",
                item.credential_id or "",
                "true" if item.renews_automatically else "false",
            ).set(item.not_after.timestamp())
        instruments.renewing.set(on_time)
        instruments.renewals_overdue.set(overdue)
    except FleetgateError:
        instruments.store_up.set(0)
    data_dir = request.app.state.data_dir
    if data_dir is None:
        return Response(generate_latest(instruments.registry), media_type=CONTENT_TYPE_LATEST)
    # Workers' data-plane series too, each labelled with its process.
    every = await asyncio.to_thread(merged, instruments.registry, data_dir, request.app.state.clock)
    return Response(generate_latest(every), media_type=CONTENT_TYPE_LATEST)
