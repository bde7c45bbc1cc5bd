"""/v1/groups"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response, status

from fleetgate.api.deps import CallerDep, RevisionDep, ServicesDep
from fleetgate.api.query import reject_unknown
from fleetgate.api.schemas import GroupIn, GroupOut, GroupPage, GroupPatchIn
from fleetgate.services.context import DEFAULT_PAGE, MAX_PAGE

router = APIRouter(prefix="/v1/groups", tags=["groups"])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=GroupOut)
async def create_group(
    body: GroupIn, caller: CallerDep, svc: ServicesDep, response: Response
) -> GroupOut:
    group = await svc.groups.create(caller, body.name, body.description, body.settings)
    response.headers["Location"] = f"/v1/groups/{group.name}"
    response.headers["ETag"] = f'"{group.revision}"'
    return GroupOut.of(group)


@router.get("", response_model=GroupPage)
async def list_groups(
    request: Request,
    caller: CallerDep,
    svc: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = DEFAULT_PAGE,
    cursor: str | None = None,
) -> GroupPage:
    reject_unknown(request, ())
    page = await svc.groups.list(caller, limit=limit, cursor=cursor)
    return GroupPage(items=[GroupOut.of(g) for g in page.items], next_cursor=page.next_cursor)


@router.get("/{name}", response_model=GroupOut)
async def get_group(name: str, caller: CallerDep, svc: ServicesDep, response: Response) -> GroupOut:
    group = await svc.groups.get(caller, name)
    response.headers["ETag"] = f'"{group.revision}"'
    return GroupOut.of(group)


@router.patch("/{name}", response_model=GroupOut)
async def update_group(
    name: str,
    body: GroupPatchIn,
    caller: CallerDep,
    svc: ServicesDep,
    revision: RevisionDep,
    response: Response,
) -> GroupOut:
    group = await svc.groups.update(
        caller, name, description=body.description, settings=body.settings, if_revision=revision
    )
    response.headers["ETag"] = f'"{group.revision}"'
    return GroupOut.of(group)


@router.delete("/{name}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_group(name: str, caller: CallerDep, svc: ServicesDep) -> Response:
    await svc.groups.delete(caller, name)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
