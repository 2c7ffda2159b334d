from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.core.db import SessionDep
from app.core.routing import RoleRoute
from app.core.security import Coordinator, Reader, WholeStudy
from app.idempotency.service import IdempotencyDep
from app.sites import service
from app.sites.schemas import SiteIn, SiteList, SiteOut
from app.studies.deps import StudyFromPath

router = APIRouter(prefix="/api/v1/studies/{key}/sites", tags=["sites"], route_class=RoleRoute)


@router.post("", status_code=201, response_model=SiteOut, summary="Add a site to a study",
             dependencies=[WholeStudy])
def create_site(body: SiteIn, principal: Coordinator, study: StudyFromPath, session: SessionDep,
                idem: IdempotencyDep) -> JSONResponse:
    idem.check(body)
    site = service.create(session, study.study.id, body)
    return idem.remember(201, service.to_out(site))


@router.get("", response_model=SiteList, summary="The study's sites (a site-scoped token sees its own)")
def list_sites(principal: Reader, study: StudyFromPath, session: SessionDep) -> SiteList:
    sites = service.of_study(session, study.study.id)
    return SiteList(items=[service.to_out(s) for s in sites if study.site_id in (None, s.id)])
