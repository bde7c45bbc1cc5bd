"""/v1/devices"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response, status

from fleetgate.api.deps import CallerDep, RevisionDep, ServicesDep
from fleetgate.api.query import attribute_filters, reject_unknown
from fleetgate.api.schemas import DeviceIn, DeviceOut, DevicePage, DevicePatchIn
from fleetgate.api.schemas_pki import ReplaceIn, ReplaceOut
from fleetgate.records import DeviceStatus
from fleetgate.services.context import DEFAULT_PAGE, MAX_PAGE
from fleetgate.services.devices import DevicePatch, DeviceQuery, NewDevice

router = APIRouter(prefix="/v1/devices", tags=["devices"])


def _etag(response: Response, revision: int) -> None:
    response.headers["ETag"] = f'"{revision}"'


@router.post("", status_code=status.HTTP_201_CREATED, response_model=DeviceOut)
async def create_device(
    body: DeviceIn, caller: CallerDep, svc: ServicesDep, response: Response
) -> DeviceOut:
    device = await svc.devices.create(
        caller,
        NewDevice(
            id=body.id,
            name=body.name,
            group=body.group,
            status=body.status,
            attributes=body.attributes,
            addresses=tuple(body.addresses),
            routes=body.routes,
        ),
    )
    _etag(response, device.revision)
    response.headers["Location"] = f"/v1/devices/{device.id}"
    return DeviceOut.of(device)


@router.get("", response_model=DevicePage)
async def list_devices(
    request: Request,
    caller: CallerDep,
    svc: ServicesDep,
    group: str | None = None,
    status: DeviceStatus | None = None,
    address: str | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = DEFAULT_PAGE,
    cursor: str | None = None,
) -> DevicePage:
    """Devices in id order. Filter by attribute with `attr.<key>=<value>` (repeatable)."""
    reject_unknown(request, ("group", "status", "address"), attributes=True)
    page = await svc.devices.list(
        caller,
        DeviceQuery(
            group=group, status=status, attributes=attribute_filters(request), address=address
        ),
        limit=limit,
        cursor=cursor,
    )
    return DevicePage(items=[DeviceOut.of(d) for d in page.items], next_cursor=page.next_cursor)


@router.get("/{device_id}", response_model=DeviceOut)
async def get_device(
    device_id: str, caller: CallerDep, svc: ServicesDep, response: Response
) -> DeviceOut:
    device = await svc.devices.get(caller, device_id)
    _etag(response, device.revision)
    return DeviceOut.of(device)


@router.patch("/{device_id}", response_model=DeviceOut)
async def update_device(
    device_id: str,
    body: DevicePatchIn,
    caller: CallerDep,
    svc: ServicesDep,
    revision: RevisionDep,
    response: Response,
) -> DeviceOut:
    device = await svc.devices.update(
        caller,
        device_id,
        DevicePatch(
            name=body.name,
            group=body.group,
            status=body.status,
            attributes=body.attributes,
            addresses=tuple(body.addresses) if body.addresses is not None else None,
            routes=body.routes,
        ),
        if_revision=revision,
    )
    _etag(response, device.revision)
    return DeviceOut.of(device)


@router.post("/{device_id}/replace", response_model=ReplaceOut)
async def replace_device(
    device_id: str, body: ReplaceIn, caller: CallerDep, svc: ServicesDep
) -> ReplaceOut:
    """Swap in a new device: it takes the old one's group, attributes, routes, addresses (unless
    given) and credentials; the old one's certificates are revoked (superseded) and re-issued to the
    new device where fleetgate holds the key. The old device stays, disabled and empty."""
    done = await svc.replacement.replace(
        caller,
        device_id,
        body.with_,
        name=body.name,
        addresses=tuple(body.addresses) if body.addresses is not None else None,
        attributes=body.attributes,
    )
    return ReplaceOut(
        old=DeviceOut.of(done.old),
        new=DeviceOut.of(done.new),
        revoked=list(done.revoked),
        reissued=[{"credential_id": c, "serial": s} for c, s in done.reissued],
        rebound=list(done.rebound),
    )


@router.delete("/{device_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_device(
    device_id: str, caller: CallerDep, svc: ServicesDep, revision: RevisionDep
) -> Response:
    await svc.devices.delete(caller, device_id, if_revision=revision)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
