from __future__ import annotations

import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi import Response as HTTPResponse
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.routing import compile_path
from starlette.types import Scope

from app.core.admission import GROUPED, Places, run_for_request
from app.core.crypto import Pseudonymiser, settings_sealer
from app.core.db import (
    SessionDep,
    commit_here,
    database_of,
    get_session,
    is_unique_violation,
    owns_transactions,
    rollback_here,
)
from app.core.deps import SettingsDep, get_app_settings
from app.core.errors import Conflict, Forbidden
from app.core.etag import ETAG_HEADER, IfMatch
from app.core.pagination import CursorQuery, LimitQuery, Page, decode_time_id, page_of
from app.core.routing import RoleRoute, lean
from app.core.security import COLLECTING_ROLES, Collector, Coordinator, Principal, Reader, admit, authenticate
from app.core.settings import Settings
from app.core.timeutil import utcnow
from app.idempotency.service import Idempotency, IdempotencyDep, idempotency
from app.responses import repository, service, together
from app.responses.schemas import CorrectionIn, ResponseCreated, ResponseIn, ResponseOut
from app.studies import service as studies
from app.studies.deps import STUDY_KEY_MAX_LENGTH, StudyFromPath, StudyKeyInScope, study_key_in_scope
from app.studies.service import StudyContext

router = APIRouter(prefix="/api/v1/studies/{key}/responses", tags=["responses"], route_class=RoleRoute)


def _pseudonymiser(session: Session, settings: Settings, study: StudyContext) -> Pseudonymiser:
    return studies.pseudonymiser(session, study.study, settings_sealer(settings))


def _sees_external_id(principal: Principal) -> bool:
    return principal.role in ("admin", "coordinator")


_IDEMPOTENCY_KEY_LENGTH = range(1, 256)  # the declared Idempotency-Key header's bounds
_session_of = asynccontextmanager(get_session)


async def _submit_lean(request: Request) -> Response | None:
    """`submit` without FastAPI's dependency machinery, for a request whose path, headers and body are
    valid as declared (None otherwise, before any work: `submit` then answers, with its errors).

    The same steps in the same order as `submit`'s dependencies: the request's session (committed or
    rolled back as `get_session` does), the token, the role, the study key's scope, the idempotency
    context, then the one thread hop. The body is validated from its bytes in one step.
    """
    key = request.path_params["key"]
    idempotency_key = request.headers.get("idempotency-key")
    media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if (len(key) > STUDY_KEY_MAX_LENGTH or (idempotency_key is not None and len(idempotency_key)
                                            not in _IDEMPOTENCY_KEY_LENGTH)
            or not (media == "application/json" or media.endswith("+json"))):
        return None
    try:
        body = ResponseIn.model_validate_json(await request.body())
    except ValidationError:
        return None
    async with _session_of(request) as session:
        principal = admit(await authenticate(request, session), *COLLECTING_ROLES)
        await study_key_in_scope(request, principal, key)
        idem = await idempotency(request, session, principal, await get_app_settings(request), idempotency_key)
        groups: together.Groups | None = getattr(request.app.state, "response_groups", None)
        # only a request admitted to wait for a group without a place goes to one (a group takes a place)
        if groups is not None and owns_transactions(session) and GROUPED in request.scope:
            return await groups.store(together.Pending(database_of(request), key, body, principal, idem, session))
        return await run_for_request(request, lambda: _submit(session, key, body, principal, idem))


@router.post(
    "", status_code=201, response_model=ResponseCreated,
    responses={200: {"model": ResponseCreated, "description": "merged into an existing partial response"}},
    summary="Submit answers for a participant and wave",
)
@lean(_submit_lean)
async def submit(request: Request, body: ResponseIn, principal: Collector, key: StudyKeyInScope,
                 session: SessionDep, idem: IdempotencyDep) -> JSONResponse:
    # The hot path: everything before this is checked without the database (for known tokens and
    # studies), and all of the request's database work, commit included, runs in one thread hop.
    return await run_for_request(request, lambda: _submit(session, key, body, principal, idem))


def _submit(session: Session, key: str, body: ResponseIn, principal: Principal, idem: Idempotency) -> JSONResponse:
    """One response stored on its own, its transaction committed, or rolled back here when it fails: in
    this thread, while the request still holds its place (see app.core.admission.run_for_request)."""
    try:
        return _submit_in(session, key, body, principal, idem)
    except BaseException:
        rollback_here(session)
        raise


def _submit_in(session: Session, key: str, body: ResponseIn, principal: Principal, idem: Idempotency
               ) -> JSONResponse:
    now = utcnow()
    done = service.submit_reading_first(session, key, body, principal, idem, now)
    if done is None:
        study = studies.context(session, key, principal)
        idem.check(body)
        done = service.submit(session, study, body, principal, now)
    result, created = done
    reply = idem.remember(201 if created else 200, result)
    try:
        commit_here(session)
    except IntegrityError as exc:
        if not is_unique_violation(exc):
            raise
        # stored meanwhile by a writer that does not take the participant's lock (a bulk import)
        raise Conflict(f"a {body.wave} response of {body.external_id!r} was stored meanwhile; "
                       "send it again to merge") from None
    return reply


def response_groups(settings: Settings, places: Places | None = None) -> together.Groups:
    """How concurrent `POST /responses` are stored together (see app.responses.together): groups of up to
    32 requests, two at a time in a lane (one study, one token; one at a time with a pool of under
    eight connections), each holding one of `places` while it is stored. Measured on the bench at 32
    clients, two at a time stored 6-20 % more a second than one and 2-5 % more than four."""
    return together.Groups(_submit, at_once=2 if settings.db_pool_size >= 8 else 1, largest=32, places=places)


_COLLECTION = compile_path(router.prefix)[0]  # POST's path: the router's own, with any study key


def waits_for_a_group(app: Any) -> Callable[[Scope], bool]:
    """Which requests Admission lets wait for a group without a place of their own: `POST /responses`
    while `app` stores responses in groups."""
    def grouped(scope: Scope) -> bool:
        return (scope["method"] == "POST" and getattr(app.state, "response_groups", None) is not None
                and _COLLECTION.match(scope["path"]) is not None)
    return grouped


@router.get("", response_model=Page[ResponseOut], summary="Stored responses, answers exactly as received")
def list_responses(
    principal: Reader, study: StudyFromPath, session: SessionDep, settings: SettingsDep,
    external_id: Annotated[str | None, Query(description="coordinators only: analysts filter by pseudonym")] = None,
    pseudonym: Annotated[str | None, Query(max_length=64, description="the participant's study pseudonym")] = None,
    wave: str | None = None, status: Literal["complete", "partial"] | None = None,
    limit: LimitQuery = 100, cursor: CursorQuery = None,
) -> Page[ResponseOut]:
    if external_id is not None and not _sees_external_id(principal):
        # a filter that works would link an external id to its pseudonym
        raise Forbidden(f"the {principal.role} role filters by pseudonym, not external_id")
    pseudonymise = _pseudonymiser(session, settings, study)
    by_pseudonym = (pseudonym, *pseudonymise.sql_pads()) if pseudonym is not None else None
    rows = repository.page(session, study_id=study.study.id, limit=limit, after=decode_time_id(cursor),
                           external_id=external_id, wave=wave, status=status, pseudonym=by_pseudonym,
                           site_id=study.site_id)
    page = page_of(rows, limit, lambda r: (r[0].received_at.isoformat(), str(r[0].id)))
    items = service.to_out(session, study, page.items, show_external_id=_sees_external_id(principal),
                           pseudonymise=pseudonymise)
    return Page(items=items, next_cursor=page.next_cursor)


@router.get("/{response_id}", response_model=ResponseOut, summary="One stored response",
            responses={200: {"description": "the response; `ETag` is its version", "headers": ETAG_HEADER}})
def get_response(response_id: uuid.UUID, principal: Reader, study: StudyFromPath, session: SessionDep,
                 settings: SettingsDep, http: HTTPResponse) -> ResponseOut:
    row = service.get(session, study, response_id)
    http.headers["ETag"] = service.etag(row[0])
    return service.to_out(session, study, [row], show_external_id=_sees_external_id(principal),
                          pseudonymise=_pseudonymiser(session, settings, study))[0]


@router.patch(
    "/{response_id}", response_model=ResponseOut, summary="Correct answers (coordinator, audited)",
    description="Send the `ETag` of the version you read as `If-Match`: if someone corrected the response since, "
                "the answer is 412 with the current `ETag` (header and `current_etag`) and nothing is changed. "
                "Without `If-Match` the correction applies as in contract v1.",
    responses={200: {"description": "the corrected response and its new `ETag`", "headers": ETAG_HEADER},
               412: {"description": "`If-Match` is not the current version (problem+json with `current_etag`)"}},
)
def correct_response(response_id: uuid.UUID, body: CorrectionIn, principal: Coordinator, study: StudyFromPath,
                     session: SessionDep, settings: SettingsDep, http: HTTPResponse,
                     if_match: IfMatch = None) -> ResponseOut:
    row = service.correct(session, study, response_id, body, principal, utcnow(), if_match=if_match)
    http.headers["ETag"] = service.etag(row[0])
    return service.to_out(session, study, [row], show_external_id=True,
                          pseudonymise=_pseudonymiser(session, settings, study))[0]
