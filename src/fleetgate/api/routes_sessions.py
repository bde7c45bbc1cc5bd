"""/v1/sessions: remote access to one device's port, for a while, from named sources."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from cryptography.hazmat.primitives import serialization
from fastapi import APIRouter, Query, Request, Response, status
from pydantic import BaseModel, Field

from fleetgate.api.deps import CallerDep, ServicesDep
from fleetgate.api.query import reject_unknown
from fleetgate.api.schemas import Strict
from fleetgate.errors import Conflict
from fleetgate.remote.records import Session, SessionEvent
from fleetgate.services.bundle import Services
from fleetgate.services.context import DEFAULT_PAGE, MAX_PAGE
from fleetgate.services.sessions import SessionRequest

BIND_ATTEMPTS = 3  # public ports tried before the API gives up

router = APIRouter(prefix="/v1/sessions", tags=["sessions"])


class SessionIn(Strict):
    device_id: str = Field(max_length=128)
    port: int = Field(ge=1, le=65535, description="the device's port", examples=[22])
    duration_s: int | None = Field(
        default=None, ge=5, le=28_800, description="default: sessions.default_duration_s"
    )
    cidrs: list[str] = Field(
        default_factory=list,
        max_length=32,
        description="sources allowed to connect; default: the address of this request",
        examples=[["203.0.113.0/24"]],
    )
    tls: bool = Field(default=False, description="terminate TLS at fleetgate")
    mtls: bool = Field(
        default=False,
        description="tls, and only the client certificate minted for this session gets in "
        "(POST /v1/sessions/{id}/client-credential hands it out; it expires with the session)",
    )


class SessionOut(BaseModel):
    id: str
    device_id: str
    device_port: int
    public_host: str
    public_port: int
    cidrs: list[str]
    tls: bool
    mtls: bool
    ca_pem: str | None = Field(description="tls: the CA the client verifies fleetgate with")
    created_at: datetime
    expires_at: datetime
    ended_at: datetime | None
    end_reason: str | None
    state: str  # open | ended


class SessionPage(BaseModel):
    items: list[SessionOut]
    next_cursor: str | None


class SessionEventOut(BaseModel):
    id: int
    at: datetime
    kind: str
    source: str | None
    destination: str | None
    detail: dict[str, Any]

    @classmethod
    def of(cls, event: SessionEvent) -> SessionEventOut:
        return cls(
            id=event.id,
            at=event.at,
            kind=event.kind.value,
            source=event.source,
            destination=event.destination,
            detail=dict(event.detail),
        )


class SessionEventPage(BaseModel):
    items: list[SessionEventOut]
    next_cursor: str | None


async def _out(svc: Services, session: Session) -> SessionOut:
    config = svc.sessions.config
    ca_pem = None
    if session.tls:
        _, roots = await svc.authority.chain()
        ca_pem = "".join(r.public_bytes(serialization.Encoding.PEM).decode() for r in roots)
    return SessionOut(
        id=session.id,
        device_id=session.device_id,
        device_port=session.device_port,
        public_host=config.public_host or config.bind,
        public_port=session.public_port,
        cidrs=list(session.cidrs),
        tls=session.tls,
        mtls=session.client_serial is not None,
        ca_pem=ca_pem,
        created_at=session.created_at,
        expires_at=session.expires_at,
        ended_at=session.ended_at,
        end_reason=session.end_reason,
        state="open" if session.open else "ended",
    )


@router.post("", status_code=status.HTTP_201_CREATED, response_model=SessionOut)
async def open_session(
    body: SessionIn, caller: CallerDep, svc: ServicesDep, request: Request, response: Response
) -> SessionOut:
    """Map a public port to the device's port until the session expires or is deleted.

    A public port another program holds is passed over (for a while) and the next one taken."""
    wanted = SessionRequest(
        device_id=body.device_id,
        port=body.port,
        duration_s=body.duration_s,
        cidrs=tuple(body.cidrs),
        tls=body.tls,
        mtls=body.mtls,
    )
    check = request.app.state.session_bind_failure
    held: list[str] = []
    for _ in range(BIND_ATTEMPTS):
        try:
            session = await svc.sessions.open(caller, wanted)
        except Conflict:
            if not held:
                raise
            break  # no port left but the ones that could not be bound
        failure = await check(session.id) if check is not None else None
        if failure is None:
            response.headers["Location"] = f"/v1/sessions/{session.id}"
            return await _out(svc, session)
        await svc.sessions.abandon(session.id, failure.reason, failure.why)
        if failure.reason != "bind_failed":
            raise Conflict(f"the session could not be served: {failure.why}")
        svc.sessions.quarantine_port(session.public_port)
        held.append(f"{session.public_port} ({failure.why})")
    raise Conflict(f"public ports could not be bound: {', '.join(held)}; keep sessions.ports clear")


@router.get("", response_model=SessionPage)
async def list_sessions(
    request: Request,
    caller: CallerDep,
    svc: ServicesDep,
    device_id: str | None = None,
    state: str | None = Query(default=None, pattern="^(open|all)$"),
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = DEFAULT_PAGE,
    cursor: str | None = None,
) -> SessionPage:
    """Sessions in id order; `state=open` for the ones still open."""
    reject_unknown(request, ("device_id", "state"))
    page = await svc.sessions.search(
        caller, device_id=device_id, open_only=state == "open", limit=limit, cursor=cursor
    )
    items = [await _out(svc, s) for s in page.items]
    return SessionPage(items=items, next_cursor=page.next_cursor)


@router.get("/{session_id}", response_model=SessionOut)
async def get_session(session_id: str, caller: CallerDep, svc: ServicesDep) -> SessionOut:
    return await _out(svc, await svc.sessions.get(caller, session_id))


@router.delete("/{session_id}", response_model=SessionOut)
async def delete_session(session_id: str, caller: CallerDep, svc: ServicesDep) -> SessionOut:
    """Close the session now: its port stops listening and live connections are cut."""
    return await _out(svc, await svc.sessions.delete(caller, session_id))


class ClientCredentialOut(BaseModel):
    chain_pem: str  # the session's client certificate, then its issuing CA
    key_pem: str


@router.post("/{session_id}/client-credential", response_model=ClientCredentialOut)
async def client_credential(
    session_id: str, caller: CallerDep, svc: ServicesDep
) -> ClientCredentialOut:
    """An mtls session's client certificate and private key (audited; while it is open)."""
    found = await svc.sessions.client_credential(caller, session_id)
    return ClientCredentialOut(chain_pem=found.chain_pem, key_pem=found.key_pem)


@router.get("/{session_id}/events", response_model=SessionEventPage)
async def session_events(
    session_id: str,
    caller: CallerDep,
    svc: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = DEFAULT_PAGE,
    cursor: str | None = None,
) -> SessionEventPage:
    """What happened to the session, oldest first: CREATED, ACCESS, DENIED, CONNECTED, CLOSED,
    REFUSED (with a diagnosis), EXPIRED, DELETED."""
    page = await svc.sessions.events(caller, session_id, limit=limit, cursor=cursor)
    return SessionEventPage(
        items=[SessionEventOut.of(e) for e in page.items], next_cursor=page.next_cursor
    )
