from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from app.core.crypto import settings_sealer
from app.core.db import SessionDep
from app.core.deps import SettingsDep
from app.core.etag import ETAG_HEADER
from app.core.pagination import CursorQuery, LimitQuery, Page, decode_time_id, page_of, time_id_key
from app.core.routing import RoleRoute
from app.core.security import Coordinator, WholeStudy
from app.core.timeutil import utcnow
from app.idempotency.service import IdempotencyDep
from app.participants import importer, repository, service
from app.participants.schemas import (
    DateShiftOut,
    ImportResult,
    ParticipantIn,
    ParticipantOut,
    ParticipantStatus,
    ScheduleStatus,
    SiteMoveIn,
)
from app.studies import service as studies
from app.studies.deps import StudyFromPath

router = APIRouter(prefix="/api/v1/studies/{key}", tags=["participants"], route_class=RoleRoute)

IMPORT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "text/csv": {"schema": {"type": "string"},
                         "example": "external_id,enrolled_at,timezone,email,phone,name\n"
                                    "P0001,2026-01-05T10:00:00-05:00,,p1@example.org,,Ana\n"},
            "application/json": {"schema": {"type": "array", "items": {"$ref": "#/components/schemas/ParticipantIn"}}},
        },
    }
}


@router.post("/participants", status_code=201, response_model=ParticipantOut, summary="Enrol a participant")
def enrol(body: ParticipantIn, principal: Coordinator, study: StudyFromPath, session: SessionDep,
          settings: SettingsDep, idem: IdempotencyDep) -> JSONResponse:
    idem.check(body)
    now = utcnow()
    view = service.enrol(session, study, body, settings_sealer(settings), now)
    location = f"/api/v1/studies/{study.study.key}/participants/{body.external_id}"
    return idem.remember(201, view.out(now), headers={"Location": location}, resource_id=view.participant.id)


@router.post(
    "/participants:import", response_model=ImportResult, openapi_extra=IMPORT_BODY,
    summary="Enrol many participants from CSV or a JSON array",
    description="All-or-nothing unless `partial=true`; every problem is listed with its row, field and code.",
)
async def import_participants(
    request: Request, principal: Coordinator, study: StudyFromPath, session: SessionDep, settings: SettingsDep,
    idem: IdempotencyDep,
    partial: Annotated[bool, Query(description="store the good rows even if others are bad")] = False,
) -> JSONResponse:
    raw = await request.body()
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    records, csv_mode = importer.read_csv(raw) if ctype in ("text/csv", "application/csv") else importer.read_json(raw)

    def work() -> JSONResponse:
        idem.check(raw + (b"?partial" if partial else b""))
        rows, errors = importer.validate(records, csv_mode=csv_mode)
        result = service.import_rows(session, study, rows, errors, partial=partial,
                                     sealer=settings_sealer(settings), now=utcnow())
        return idem.remember(200, result)

    return await run_in_threadpool(work)


@router.get("/participants", response_model=Page[ParticipantOut], summary="List participants")
def list_participants(
    principal: Coordinator, study: StudyFromPath, session: SessionDep, settings: SettingsDep,
    status: ParticipantStatus | None = None,
    wave: Annotated[str | None, Query(description="with wave_status: the status of this wave")] = None,
    wave_status: Annotated[ScheduleStatus | None, Query(description="participants with a wave in this status")] = None,
    site: Annotated[str | None, Query(max_length=63, description="participants of this site")] = None,
    limit: LimitQuery = 100, cursor: CursorQuery = None,
) -> Page[ParticipantOut]:
    now = utcnow()
    rows = repository.page(session, study_id=study.study.id, limit=limit, after=decode_time_id(cursor),
                           status=status, wave=wave, wave_status=wave_status, now=now,
                           site_id=service.site_filter(session, study, site))
    page = page_of(rows, limit, time_id_key)
    views = service.views(session, page.items, settings_sealer(settings))
    return Page(items=[v.out(now) for v in views], next_cursor=page.next_cursor)


@router.get("/participants/{external_id}", response_model=ParticipantOut, summary="One participant and schedule",
            responses={200: {"description": "the participant; `ETag` is its version", "headers": ETAG_HEADER}})
def get_participant(external_id: str, principal: Coordinator, study: StudyFromPath, session: SessionDep,
                    settings: SettingsDep, response: Response) -> ParticipantOut:
    view = service.view(session, study, external_id, settings_sealer(settings))
    response.headers["ETag"] = service.etag(view)
    return view.out(utcnow())


@router.post("/participants/{external_id}/move", response_model=ParticipantOut, dependencies=[WholeStudy],
             summary="Move a participant to another site (whole-study coordinator; audited, with a reason)")
def move_participant(external_id: str, body: SiteMoveIn, principal: Coordinator, study: StudyFromPath,
                     session: SessionDep, settings: SettingsDep) -> ParticipantOut:
    now = utcnow()
    service.move(session, study, external_id, body, principal.token_id, now)
    return service.view(session, study, external_id, settings_sealer(settings)).out(now)


@router.get("/participants/{external_id}/date-shift", response_model=DateShiftOut,
            summary="The participant's shift in date-shifted exports (coordinator: to undo it)")
def date_shift(external_id: str, principal: Coordinator, study: StudyFromPath, session: SessionDep,
               settings: SettingsDep) -> DateShiftOut:
    participant = service.find(session, study, external_id)
    shifter = studies.date_shifter(session, study.study, settings_sealer(settings))
    return DateShiftOut(external_id=participant.external_id, days=shifter(participant.id))
