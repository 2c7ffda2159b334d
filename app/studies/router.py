from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.core.crypto import settings_sealer
from app.core.db import SessionDep
from app.core.deps import SettingsDep
from app.core.errors import NotFound
from app.core.pagination import CursorQuery, LimitQuery, Page, decode_time_id, page_of, time_id_key
from app.core.routing import RoleRoute
from app.core.security import AnyRole, Coordinator, Reader, WholeStudy
from app.idempotency.service import IdempotencyDep
from app.studies import repository, service
from app.studies.deps import StudyFromPath
from app.studies.schemas import InstrumentList, StudyCreate, StudyOut, StudyUpdate, WaveList, WaveOut

router = APIRouter(prefix="/api/v1/studies", tags=["studies"], route_class=RoleRoute)


@router.post("", status_code=201, response_model=StudyOut, summary="Create a study")
def create_study(body: StudyCreate, principal: Coordinator, session: SessionDep, settings: SettingsDep,
                 idem: IdempotencyDep) -> JSONResponse:
    principal.require_unscoped("create studies")
    idem.check(body)
    ctx = service.create(session, body, settings_sealer(settings))
    return idem.remember(201, service.to_out(ctx), headers={"Location": f"/api/v1/studies/{ctx.study.key}"})


@router.get("", response_model=Page[StudyOut], summary="List studies")
def list_studies(principal: Reader, session: SessionDep, limit: LimitQuery = 100,
                 cursor: CursorQuery = None) -> Page[StudyOut]:
    studies = repository.page(session, limit=limit, after=decode_time_id(cursor), only=principal.study_id)
    page = page_of(studies, limit, time_id_key)
    return Page(items=[service.to_out(service.context(session, s.key, principal)) for s in page.items],
                next_cursor=page.next_cursor)


@router.get("/{key}", response_model=StudyOut, summary="Get a study")
def get_study(principal: Reader, study: StudyFromPath) -> StudyOut:
    return service.to_out(study)


@router.patch("/{key}", dependencies=[WholeStudy],
              response_model=StudyOut,
              summary="Rename a study, or set its withdrawal policy, survey language, contact line or export dates")
def update_study(body: StudyUpdate, principal: Coordinator, study: StudyFromPath, session: SessionDep) -> StudyOut:
    return service.to_out(service.update(session, study, body))


@router.get("/{key}/waves", response_model=WaveList, summary="The study's waves and their windows")
def get_waves(principal: Reader, study: StudyFromPath, session: SessionDep) -> WaveList:
    waves = repository.waves(session, study.study.id)
    return WaveList(items=[WaveOut.model_validate(w, from_attributes=True) for w in waves])


@router.get(
    "/{key}/instruments", response_model=InstrumentList, response_model_exclude_unset=True,
    summary="The study's instruments and items, exactly as in its codebook",
)
def get_instruments(principal: AnyRole, study: StudyFromPath) -> InstrumentList:
    codebook = study.require_codebook()
    return InstrumentList.model_validate({"items": codebook.document["instruments"]})


@router.get("/{key}/simulation", dependencies=[WholeStudy],
            summary="True coefficients of a simulated cohort (cohort simulate)")
def get_simulation(principal: Reader, study: StudyFromPath) -> dict[str, Any]:
    simulations = (study.study.settings or {}).get("simulations")
    if not simulations:
        raise NotFound(f"study {study.study.key!r} holds no simulated cohort")
    return {"seeds": simulations}


@router.get("/{key}/codebook", summary="The codebook in force, exactly as installed")
def get_codebook(principal: AnyRole, study: StudyFromPath) -> dict[str, Any]:
    return study.require_codebook().document
