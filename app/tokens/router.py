from __future__ import annotations

import uuid

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from app.core.db import SessionDep
from app.core.pagination import CursorQuery, LimitQuery, Page, decode_time_id, page_of, time_id_key
from app.core.routing import RoleRoute
from app.core.security import AdminOnly
from app.idempotency.service import IdempotencyDep
from app.tokens import repository, service
from app.tokens.schemas import TokenCreate, TokenCreated, TokenOut

router = APIRouter(prefix="/api/v1/tokens", tags=["tokens"], route_class=RoleRoute)


@router.post("", status_code=201, response_model=TokenCreated, summary="Create a token (the secret is shown once)")
def create_token(body: TokenCreate, principal: AdminOnly, session: SessionDep, idem: IdempotencyDep) -> JSONResponse:
    idem.check(body)
    created = service.create(session, role=body.role, label=body.label, study_key=body.study_key,
                             site_key=body.site_key, created_by=principal, redcap=body.format == "redcap")
    return idem.remember(201, created)


@router.get("", response_model=Page[TokenOut], summary="List tokens (never their secrets)")
def list_tokens(principal: AdminOnly, session: SessionDep, limit: LimitQuery = 100,
                cursor: CursorQuery = None) -> Page[TokenOut]:
    rows = repository.page(session, limit=limit, after=decode_time_id(cursor), only=principal.study_id)
    page = page_of(rows, limit, lambda r: time_id_key(r[0]))
    return Page(items=[service.to_out(t, k, site) for t, k, site in page.items], next_cursor=page.next_cursor)


@router.delete("/{token_id}", status_code=204, summary="Revoke a token")
def revoke_token(token_id: uuid.UUID, principal: AdminOnly, session: SessionDep) -> Response:
    service.revoke(session, token_id, principal)
    return Response(status_code=204)
