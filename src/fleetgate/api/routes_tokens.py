"""/v1/tokens and /v1/whoami"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response, status

from fleetgate.api.deps import CallerDep, ServicesDep
from fleetgate.api.query import reject_unknown
from fleetgate.api.schemas import TokenCreated, TokenIn, TokenOut, TokenPage, WhoAmI
from fleetgate.errors import InvalidRequest
from fleetgate.services.context import DEFAULT_PAGE, MAX_PAGE

router = APIRouter(tags=["tokens"])


@router.get("/v1/whoami", response_model=WhoAmI)
async def whoami(caller: CallerDep) -> WhoAmI:
    p = caller.principal
    return WhoAmI(token_id=p.token_id, name=p.name, role=p.role, groups=list(p.groups))


@router.post("/v1/tokens", status_code=status.HTTP_201_CREATED, response_model=TokenCreated)
async def create_token(
    body: TokenIn, caller: CallerDep, svc: ServicesDep, request: Request
) -> TokenCreated:
    if body.expires_at is not None and body.expires_in_s is not None:
        raise InvalidRequest("give expires_at or expires_in_s, not both", field="expires_in_s")
    expires_at = body.expires_at
    if expires_at is not None and expires_at.tzinfo is None:
        raise InvalidRequest(
            "expires_at needs a timezone, like 2027-01-01T00:00:00Z", field="expires_at"
        )
    if body.expires_in_s is not None:
        expires_at = request.app.state.clock.now() + timedelta(seconds=body.expires_in_s)
    token, secret = await svc.tokens.create(
        caller, name=body.name, role=body.role, groups=body.groups, expires_at=expires_at
    )
    return TokenCreated(token=TokenOut.of(token), secret=secret.reveal_text())


@router.get("/v1/tokens", response_model=TokenPage)
async def list_tokens(
    request: Request,
    caller: CallerDep,
    svc: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = DEFAULT_PAGE,
    cursor: str | None = None,
) -> TokenPage:
    reject_unknown(request, ())
    page = await svc.tokens.list(caller, limit=limit, cursor=cursor)
    return TokenPage(items=[TokenOut.of(t) for t in page.items], next_cursor=page.next_cursor)


@router.get("/v1/tokens/{token_id}", response_model=TokenOut)
async def get_token(token_id: str, caller: CallerDep, svc: ServicesDep) -> TokenOut:
    return TokenOut.of(await svc.tokens.get(caller, token_id))


@router.delete("/v1/tokens/{token_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_token(token_id: str, caller: CallerDep, svc: ServicesDep) -> Response:
    await svc.tokens.delete(caller, token_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
