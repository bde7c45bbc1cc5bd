"""/v1/credentials: the credential store. Secrets go in, and never come out (but an x509
key, once, through export)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response, status

from fleetgate.api.deps import CallerDep, ServicesDep
from fleetgate.api.query import reject_unknown
from fleetgate.api.schemas_pki import (
    CredentialIn,
    CredentialOut,
    CredentialPage,
    CredentialPatchIn,
    ExportIn,
    ResolveOut,
)
from fleetgate.pki.records import CredentialKind
from fleetgate.sealing import Secret
from fleetgate.services.context import DEFAULT_PAGE, MAX_PAGE
from fleetgate.services.credentials import CredentialInput
from fleetgate.templates import Template

router = APIRouter(tags=["credentials"])


@router.post("/v1/credentials", status_code=status.HTTP_201_CREATED, response_model=CredentialOut)
async def create_credential(
    body: CredentialIn, caller: CallerDep, svc: ServicesDep, response: Response
) -> CredentialOut:
    credential = await svc.credentials.create(
        caller,
        CredentialInput(
            id=body.id,
            kind=CredentialKind(body.kind),
            description=body.description,
            device_id=body.device_id,
            public=body.public,
            secret=Secret(body.secret) if body.secret is not None else None,
            certificate_pem=body.certificate_pem,
            chain_pem=body.chain_pem,
        ),
    )
    response.headers["Location"] = f"/v1/credentials/{credential.id}"
    return CredentialOut.of(credential)


@router.get("/v1/credentials", response_model=CredentialPage)
async def list_credentials(
    request: Request,
    caller: CallerDep,
    svc: ServicesDep,
    device_id: str | None = None,
    kind: CredentialKind | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = DEFAULT_PAGE,
    cursor: str | None = None,
) -> CredentialPage:
    reject_unknown(request, ("device_id", "kind"))
    page = await svc.credentials.list(
        caller, limit=limit, cursor=cursor, device_id=device_id, kind=kind
    )
    return CredentialPage(
        items=[CredentialOut.of(c) for c in page.items], next_cursor=page.next_cursor
    )


@router.get("/v1/credentials/{credential_id}", response_model=CredentialOut)
async def get_credential(credential_id: str, caller: CallerDep, svc: ServicesDep) -> CredentialOut:
    return CredentialOut.of(await svc.credentials.get(caller, credential_id))


@router.patch("/v1/credentials/{credential_id}", response_model=CredentialOut)
async def update_credential(
    credential_id: str, body: CredentialPatchIn, caller: CallerDep, svc: ServicesDep
) -> CredentialOut:
    updated = await svc.credentials.update(
        caller,
        credential_id,
        description=body.description,
        public=body.public,
        secret=Secret(body.secret) if body.secret is not None else None,
    )
    return CredentialOut.of(updated)


@router.delete("/v1/credentials/{credential_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_credential(credential_id: str, caller: CallerDep, svc: ServicesDep) -> Response:
    await svc.credentials.delete(caller, credential_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/v1/credentials/{credential_id}/export", response_class=Response)
async def export_credential(
    credential_id: str, body: ExportIn, caller: CallerDep, svc: ServicesDep
) -> Response:
    """An x509 credential's private key with its certificate and chain, once: PEM, or PKCS#12
    protected by `password`. A second export is refused (409)."""
    media, data = await svc.credentials.export(
        caller,
        credential_id,
        fmt=body.format,
        password=Secret(body.password) if body.password is not None else None,
    )
    return Response(data, media_type=media, headers={"Cache-Control": "no-store"})


@router.get("/v1/devices/{device_id}/credentials/resolve", response_model=ResolveOut)
async def resolve_credential(
    device_id: str,
    template: str,
    caller: CallerDep,
    svc: ServicesDep,
    request: Request,
    default: str | None = None,
) -> ResolveOut:
    """Which credential a template such as `aws-#{imsi}` names for this device (with a
    default when it names none) — what a route will present for it."""
    reject_unknown(request, ("template", "default"))
    device = await svc.devices.get(caller, device_id)
    parsed = Template.parse(template)
    expanded = parsed.expand(device.id, device.group, device.attributes)
    found = await svc.credentials.resolve(device, parsed, default)
    return ResolveOut(
        template=template,
        expanded=expanded,
        credential=CredentialOut.of(found) if found is not None else None,
    )
