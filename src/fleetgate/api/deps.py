"""Request-scoped collaborators: the caller behind the bearer token, and the services."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from fleetgate.errors import InvalidRequest, Unauthenticated
from fleetgate.services.bundle import Services
from fleetgate.services.context import Caller

_bearer = HTTPBearer(auto_error=False, description="An API token: `Authorization: Bearer fgt_…`")


def services(request: Request) -> Services:
    found: Services = request.app.state.services
    return found


async def caller(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Caller:
    if credentials is None:
        raise Unauthenticated("send an API token: Authorization: Bearer <token>")
    principal = await services(request).tokens.authenticate(credentials.credentials)
    client = request.client
    return Caller(
        principal=principal,
        request_id=getattr(request.state, "request_id", None),
        source=client.host if client else None,
    )


def if_match_revision(request: Request) -> int | None:
    """``If-Match: "3"`` (the ETag we sent) -> 3."""
    value = request.headers.get("if-match")
    if value is None:
        return None
    text = value.strip().removeprefix("W/").strip('"')
    if not text.isdigit():
        raise InvalidRequest('If-Match must be an ETag this API sent, like "3"', field="If-Match")
    return int(text)


CallerDep = Annotated[Caller, Depends(caller)]
ServicesDep = Annotated[Services, Depends(services)]
RevisionDep = Annotated[int | None, Depends(if_match_revision)]
