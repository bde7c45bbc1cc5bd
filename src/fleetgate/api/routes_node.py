"""The running node itself: reload its configuration and TLS material (what SIGHUP does)."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel

from fleetgate.api.deps import CallerDep
from fleetgate.auth.authz import require_unscoped_admin
from fleetgate.errors import ConfigError, Conflict, NotFound
from fleetgate.health import Health
from fleetgate.logs import get_logger

router = APIRouter(tags=["node"])
log = get_logger("fleetgate.api")


class ReloadOut(BaseModel):
    listeners: dict[str, str]  # each listener's state after the reload ("bound", or why not)


@router.post("/v1/node/reload", response_model=ReloadOut)
async def reload(request: Request, caller: CallerDep) -> ReloadOut:
    """Read the configuration file again and every listener's TLS material (certificate, key,
    CAs, CRLs, PSKs), as SIGHUP does, and answer once it is applied. Established connections
    are kept; a listener whose new material is unusable keeps the old and says why in the log."""
    require_unscoped_admin(caller.principal, "reloading the node")
    action: Callable[[], Coroutine[Any, Any, None]] | None = request.app.state.reload
    if action is None:
        raise NotFound("this process has nothing to reload")
    log.info("node.reload_requested", actor=caller.principal.actor)
    try:
        # In a context of its own: listeners and tasks started by the reload must not log
        # this request's id for the rest of their lives.
        await asyncio.get_running_loop().create_task(action(), context=contextvars.Context())
    except ConfigError as exc:
        raise Conflict(
            f"the configuration file is invalid, nothing was reloaded: {exc.detail}",
            field="config",
        ) from None
    health: Health = request.app.state.health
    return ReloadOut(listeners=dict(health.listeners))
