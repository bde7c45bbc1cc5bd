"""Public PKI endpoints (no token): the CA chain, CRLs, and the OCSP responder.

Relying parties (devices, brokers, clouds) fetch these without credentials, as RFC 5280 and
RFC 6960 expect. Malformed OCSP requests get HTTP 400 carrying an OCSP ``malformedRequest``.
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from email.utils import format_datetime
from typing import Annotated

from cryptography.hazmat.primitives import serialization
from cryptography.x509 import load_der_x509_crl, ocsp
from fastapi import APIRouter, Path, Request, Response

from fleetgate.api.deps import ServicesDep
from fleetgate.errors import InvalidRequest, NotFound
from fleetgate.pki.ocsp import MAX_REQUEST_BYTES, parse_request
from fleetgate.services.authority import pem
from fleetgate.services.revocation import unsuccessful

router = APIRouter(prefix="/pki", tags=["pki (public)"])
PEM_TYPE = "application/x-pem-file"
CA_ID = Annotated[str, Path(pattern=r"^[a-z]+-[0-9a-f]{8}$")]


# Caches may keep revocation data this long at most, so a revocation reaches everyone behind a
# cache within a minute (relying parties still trust a CRL until its nextUpdate).
MAX_CACHE_S = 60


def _cache(response: Response, until: datetime, now: datetime) -> None:
    seconds = max(0, min(MAX_CACHE_S, int((until - now).total_seconds())))
    response.headers["Cache-Control"] = f"public, max-age={seconds}, no-transform"


@router.get("/ca.pem", response_class=Response)
async def ca_pem(svc: ServicesDep) -> Response:
    """Every valid issuing CA (newest first), then the root: what devices and brokers trust."""
    issuing, roots = await svc.authority.chain()
    if not issuing:
        raise NotFound("there is no CA yet")
    return Response("".join(pem(c) for c in [*issuing, *roots]), media_type=PEM_TYPE)


@router.get("/root.pem", response_class=Response)
async def root_pem(svc: ServicesDep) -> Response:
    _, roots = await svc.authority.chain()
    if not roots:
        raise NotFound("fleetgate has no root CA (an imported issuing CA's root was not given)")
    return Response("".join(pem(c) for c in roots), media_type=PEM_TYPE)


@router.get("/issuing.pem", response_class=Response)
async def issuing_pem(svc: ServicesDep) -> Response:
    issuing, _ = await svc.authority.chain()
    if not issuing:
        raise NotFound("there is no CA yet")
    return Response("".join(pem(c) for c in issuing), media_type=PEM_TYPE)


@router.get("/ca/{ca_id}.der", response_class=Response)
async def ca_der(ca_id: CA_ID, svc: ServicesDep) -> Response:
    """One CA certificate in DER (the AIA caIssuers location of issued certificates)."""
    for ca in await svc.authority.authorities():
        if ca.id == ca_id:
            return Response(
                ca.certificate.public_bytes(serialization.Encoding.DER),
                media_type="application/pkix-cert",
            )
    raise NotFound(f"no CA {ca_id}")


async def _crl(svc: ServicesDep, issuer_id: str | None, *, request: Request) -> Response:
    record = await svc.revocation.crl(issuer_id)
    response = Response(record.der, media_type="application/pkix-crl")
    _cache(response, record.next_update, request.app.state.clock.now())
    response.headers["Last-Modified"] = format_datetime(record.this_update, usegmt=True)
    return response


@router.get("/crl.der", response_class=Response)
async def crl_der(svc: ServicesDep, request: Request) -> Response:
    """The active issuing CA's CRL (DER holds one CRL; after a rotation the previous issuer's
    is at /pki/crl/<issuer>.der, the distribution point its certificates name)."""
    return await _crl(svc, None, request=request)


@router.get("/crl.pem", response_class=Response)
async def crl_pem(svc: ServicesDep, request: Request) -> Response:
    """Every CA's current CRL, concatenated (what mosquitto's ``crlfile``, nginx's ``ssl_crl``
    and ``openssl verify -crl_check_all`` expect): the issuing CAs' (so certificates from before
    a rotation stay checkable) and the root's (which lists revoked issuing CAs)."""
    records = await svc.revocation.all_crls()
    if not records:
        raise NotFound("there is no issuing CA yet")
    body = b"".join(
        load_der_x509_crl(r.der).public_bytes(serialization.Encoding.PEM) for r in records
    )
    response = Response(body, media_type=PEM_TYPE)
    _cache(response, min(r.next_update for r in records), request.app.state.clock.now())
    response.headers["Last-Modified"] = format_datetime(
        max(r.this_update for r in records), usegmt=True
    )
    return response


@router.get("/crl/{ca_id}.der", response_class=Response)
async def crl_of(ca_id: CA_ID, svc: ServicesDep, request: Request) -> Response:
    """The CRL of one issuing CA (the distribution point written into its certificates)."""
    return await _crl(svc, ca_id, request=request)


async def _answer(svc: ServicesDep, data: bytes, request: Request) -> Response:
    try:
        query = parse_request(data)
    except InvalidRequest as exc:
        return Response(
            unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST),
            status_code=400,
            media_type="application/ocsp-response",
            headers={"X-Fleetgate-Reason": exc.detail[:200].encode("ascii", "replace").decode()},
        )
    body, fresh_until = await svc.revocation.ocsp(query)
    response = Response(body, media_type="application/ocsp-response")
    if query.nonce is None:
        _cache(response, fresh_until, request.app.state.clock.now())
    else:
        response.headers["Cache-Control"] = "no-store"
    return response


@router.post("/ocsp", response_class=Response)
async def ocsp_post(request: Request, svc: ServicesDep) -> Response:
    """RFC 6960 over POST: an `application/ocsp-request` body."""
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_REQUEST_BYTES:
            break
    return await _answer(svc, bytes(data), request)


@router.get("/ocsp/", response_class=Response, include_in_schema=False)
async def ocsp_get_empty(request: Request, svc: ServicesDep) -> Response:
    """A GET with no request in it: malformed, answered in OCSP like any other."""
    return await _answer(svc, b"", request)


@router.get("/ocsp/{encoded:path}", response_class=Response)
async def ocsp_get(encoded: str, request: Request, svc: ServicesDep) -> Response:
    """RFC 6960 over GET: the DER request, base64 and URL-encoded, as the last path segment."""
    if len(encoded) > MAX_REQUEST_BYTES * 2:
        return await _answer(svc, b"", request)
    try:
        data = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=False)
    except (binascii.Error, ValueError):
        data = b""
    return await _answer(svc, data, request)
