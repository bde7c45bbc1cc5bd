"""/v1/ca, /v1/certificates, /v1/inventory and issuing for a device."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response, status

from fleetgate.api.deps import CallerDep, ServicesDep
from fleetgate.api.query import reject_unknown
from fleetgate.api.schemas_pki import (
    CaImportIn,
    CaList,
    CaOut,
    CaTrustIn,
    CertificateOut,
    CertificatePage,
    GatewayIssueIn,
    InventoryList,
    InventoryOut,
    IssuedOut,
    IssueIn,
    RevokeIn,
)
from fleetgate.auth.authz import require_unscoped_admin
from fleetgate.errors import Forbidden, InvalidRequest
from fleetgate.pki.keys import KeyAlgorithm
from fleetgate.pki.profiles import Profile
from fleetgate.services.context import (
    DEFAULT_PAGE,
    MAX_PAGE,
    check_limit,
    decode_cursor,
    encode_cursor,
)
from fleetgate.services.revocation import parse_reason
from fleetgate.store.certificates import CertificateQuery, CertificateRepo

router = APIRouter(tags=["pki"])
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_window(text: str | None, field: str) -> timedelta | None:
    """``30d``, ``12h``, ``90m``, ``3600s`` or plain seconds."""
    if text is None:
        return None
    number, unit = (text[:-1], text[-1]) if text[-1:] in _UNITS else (text, "s")
    if not (number.isascii() and number.isdigit()) or len(number) > 9:
        raise InvalidRequest(f"{text[:20]!r} is not a duration like 30d, 12h or 3600", field=field)
    return timedelta(seconds=int(number) * _UNITS[unit])


@router.get("/v1/ca", response_model=CaList)
async def list_cas(caller: CallerDep, svc: ServicesDep) -> CaList:
    """Roots, issuing CAs (the active one issues) and trusted outside CAs."""
    del caller
    return CaList(items=[CaOut.of(ca) for ca in await svc.authority.authorities()])


@router.post("/v1/ca/rotate", status_code=status.HTTP_201_CREATED, response_model=CaOut)
async def rotate_issuing(caller: CallerDep, svc: ServicesDep) -> CaOut:
    """A new issuing CA under the root; the previous one keeps answering for its certificates."""
    require_unscoped_admin(caller.principal, "rotating the issuing CA")
    return CaOut.of(await svc.authority.rotate_issuing(caller))


@router.post("/v1/ca/import", status_code=status.HTTP_201_CREATED, response_model=CaOut)
async def import_ca(body: CaImportIn, caller: CallerDep, svc: ServicesDep) -> CaOut:
    """Issue from an existing CA from now on (its key is sealed and never returned)."""
    require_unscoped_admin(caller.principal, "importing a CA")
    return CaOut.of(
        await svc.authority.import_issuer(
            caller, body.certificate_pem, body.key_pem, body.chain_pem
        )
    )


@router.post("/v1/ca/trust", status_code=status.HTTP_201_CREATED, response_model=CaOut)
async def trust_ca(body: CaTrustIn, caller: CallerDep, svc: ServicesDep) -> CaOut:
    """Trust an outside CA (a manufacturer's) to authenticate devices; never used to sign."""
    require_unscoped_admin(caller.principal, "trusting a CA")
    return CaOut.of(await svc.authority.trust(caller, body.certificate_pem, body.name))


@router.post(
    "/v1/devices/{device_id}/certificates",
    status_code=status.HTTP_201_CREATED,
    response_model=IssuedOut,
)
async def issue_for_device(
    device_id: str,
    body: IssueIn,
    caller: CallerDep,
    svc: ServicesDep,
    request: Request,
    response: Response,
) -> IssuedOut:
    """A device client certificate from the device's CSR, or with a key fleetgate generates and
    keeps sealed in a credential (export it once with POST /v1/credentials/{id}/export)."""
    issued = await svc.issuing.issue_for_device(
        caller,
        device_id,
        csr=body.csr.encode() if body.csr is not None else None,
        generate=KeyAlgorithm(body.generate_key.algorithm) if body.generate_key else None,
        lifetime=timedelta(days=body.lifetime_days) if body.lifetime_days else None,
        credential_id=body.generate_key.credential_id if body.generate_key else None,
    )
    response.headers["Location"] = f"/v1/certificates/{issued.certificate.serial}"
    now = request.app.state.clock.now()
    return IssuedOut(
        certificate=CertificateOut.of(issued.certificate, now),
        certificate_pem=issued.certificate_pem,
        chain_pem=issued.chain_pem,
        credential_id=issued.credential_id,
    )


@router.post("/v1/certificates", status_code=status.HTTP_201_CREATED, response_model=IssuedOut)
async def issue_for_gateway(
    body: GatewayIssueIn,
    caller: CallerDep,
    svc: ServicesDep,
    request: Request,
    response: Response,
) -> IssuedOut:
    """A certificate for the gateway itself (a listener's server certificate, a client
    certificate towards an upstream): fleetgate makes the key, keeps it in the credential and
    renews the certificate by itself."""
    issued = await svc.issuing.issue_for_gateway(
        caller,
        body.credential_id,
        profile=Profile(body.profile),
        common_name=body.common_name,
        dns_names=tuple(body.dns_names),
        ip_addresses=tuple(body.ip_addresses),
        algorithm=KeyAlgorithm(body.algorithm),
        lifetime=timedelta(days=body.lifetime_days) if body.lifetime_days else None,
    )
    response.headers["Location"] = f"/v1/certificates/{issued.certificate.serial}"
    return IssuedOut(
        certificate=CertificateOut.of(issued.certificate, request.app.state.clock.now()),
        certificate_pem=issued.certificate_pem,
        chain_pem=issued.chain_pem,
        credential_id=issued.credential_id,
    )


@router.get("/v1/certificates", response_model=CertificatePage)
async def list_certificates(
    request: Request,
    caller: CallerDep,
    svc: ServicesDep,
    device_id: str | None = None,
    profile: Profile | None = None,
    status_: Annotated[str | None, Query(alias="status", pattern="^(valid|revoked)$")] = None,
    expiring_within: str | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = DEFAULT_PAGE,
    cursor: str | None = None,
) -> CertificatePage:
    """Certificates this CA issued, by serial; `expiring_within=30d` for the ones ending soon."""
    reject_unknown(request, ("device_id", "profile", "status", "expiring_within"))
    check_limit(limit)
    window = parse_window(expiring_within, "expiring_within")
    now = request.app.state.clock.now()
    if device_id is not None:
        await svc.devices.get(caller, device_id)  # the device's group decides visibility
    elif caller.principal.scoped:
        raise InvalidRequest(
            "a token limited to groups lists certificates per device: add device_id",
            field="device_id",
        )
    async with svc.db.snapshot() as tx:
        items = await CertificateRepo(tx).list(
            CertificateQuery(
                device_id=device_id,
                profile=profile,
                revoked=None if status_ is None else status_ == "revoked",
                valid_at=now if status_ == "valid" or window else None,
                expiring_before=now + window if window else None,
            ),
            limit=limit + 1,
            after=decode_cursor(cursor),
        )
    more = len(items) > limit
    items = items[:limit]
    return CertificatePage(
        items=[CertificateOut.of(c, now) for c in items],
        next_cursor=encode_cursor(items[-1].serial) if more else None,
    )


@router.get("/v1/certificates/{serial}", response_model=CertificateOut)
async def get_certificate(
    serial: str, caller: CallerDep, svc: ServicesDep, request: Request
) -> CertificateOut:
    cert = await svc.revocation.certificate(caller, serial)
    return CertificateOut.of(cert, request.app.state.clock.now())


@router.post("/v1/certificates/{serial}/revoke", response_model=CertificateOut)
async def revoke_certificate(
    serial: str, body: RevokeIn, caller: CallerDep, svc: ServicesDep, request: Request
) -> CertificateOut:
    """Revoke now: the CRL is regenerated and OCSP answers `revoked` before this returns."""
    revoked = await svc.revocation.revoke(caller, serial, parse_reason(body.reason))
    return CertificateOut.of(revoked, request.app.state.clock.now())


@router.get("/v1/inventory", response_model=InventoryList)
async def inventory(
    request: Request, caller: CallerDep, svc: ServicesDep, expiring_within: str | None = None
) -> InventoryList:
    """Everything with an end date fleetgate issued or holds (certificates, imported
    credentials, CAs, CRLs), soonest first."""
    reject_unknown(request, ("expiring_within",))
    if caller.principal.scoped:
        raise Forbidden("the inventory spans every group; use a token not limited to groups")
    items = await svc.lifecycle.inventory(
        expiring_within=parse_window(expiring_within, "expiring_within")
    )
    now = request.app.state.clock.now()
    return InventoryList(items=[InventoryOut.of(i, now) for i in items])
