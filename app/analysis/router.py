from __future__ import annotations

import io
import uuid
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from fastapi.responses import HTMLResponse, JSONResponse, Response

from app.analysis import service, tasks
from app.analysis.models import Analysis
from app.analysis.presentation import report_html, to_out
from app.analysis.schemas import AnalysisIn, AnalysisOut, AnalysisQueued, PlanIn, PlanOut
from app.core.db import SessionDep, on_commit
from app.core.errors import Conflict, Forbidden
from app.core.pagination import CursorQuery, LimitQuery, Page, decode_time_id, page_of, time_id_key
from app.core.routing import RoleRoute
from app.core.security import Analyst, Principal, Reader, WholeStudy
from app.idempotency.service import IdempotencyDep
from app.studies.deps import StudyFromPath

router = APIRouter(tags=["analyses"], route_class=RoleRoute, dependencies=[WholeStudy])


@router.post("/api/v1/studies/{key}/analyses", status_code=202, response_model=AnalysisQueued,
             summary="Queue a model fit on the data as it stands",
             description="Poll GET /api/v1/analyses/{id}. An identical request on unchanged data returns the "
                         "existing job (possibly already succeeded) instead of fitting again.")
def request_analysis(body: AnalysisIn, principal: Analyst, study: StudyFromPath, session: SessionDep,
                     idem: IdempotencyDep) -> JSONResponse:
    idem.check(body)
    spec = body.spec.model_dump(mode="json", exclude_unset=True) if body.spec is not None else None
    job, reused = service.request(session, study, model=body.model, variant=body.variant, spec=spec,
                                  as_of=body.as_of, requested_by=principal.token_id)
    if not reused:
        # the queued row is the guarantee (the sweep picks up a job nobody started); this starts it now
        job_id = str(job.id)
        on_commit(session, lambda: tasks.run_analysis.delay(job_id))
    out = AnalysisQueued(id=job.id, status=job.status, model=job.model, variant=job.variant or None,
                         plan_version=job.plan_version, reused=reused)
    return idem.remember(202, out, headers={"Location": f"/api/v1/analyses/{job.id}"})


@router.get("/api/v1/studies/{key}/analyses", response_model=Page[AnalysisOut], summary="A study's analyses")
def list_analyses(principal: Reader, study: StudyFromPath, session: SessionDep,
                  model: Annotated[str | None, Query(max_length=40)] = None,
                  limit: LimitQuery = 50, cursor: CursorQuery = None) -> Page[AnalysisOut]:
    rows = service.page(session, study.study.id, model, decode_time_id(cursor), limit)
    page = page_of(rows, limit, time_id_key)
    return Page(items=[to_out(j, study.study.key) for j in page.items], next_cursor=page.next_cursor)


def _plan_out(study_key: str, plan: service.CurrentPlan) -> PlanOut:
    doc = plan.doc
    return PlanOut(study=study_key, version=plan.version, created_at=plan.created_at, variables=doc.variables,
                   models=doc.models)


@router.get("/api/v1/studies/{key}/analysis-plan", response_model=PlanOut, summary="The study's analysis plan",
            description="Variables (codebook items and derived variables, recoded) and models as data; "
                        "see docs/analysis-plan.md.")
def get_plan(principal: Reader, study: StudyFromPath, session: SessionDep) -> PlanOut:
    return _plan_out(study.study.key, service.current_plan(session, study))


@router.put("/api/v1/studies/{key}/analysis-plan", response_model=PlanOut,
            summary="Store a new version of the analysis plan",
            description="Every name is checked against the codebook (422 with the path of each error); the "
                        "new version is audited. Past results keep the version they were fitted with.")
def put_plan(body: PlanIn, principal: Analyst, study: StudyFromPath, session: SessionDep) -> PlanOut:
    document = body.model_dump(mode="json", exclude={"version", "study", "created_at"}, exclude_none=True)
    plan = service.replace_plan(session, study, document, expected_version=body.version,
                                created_by=principal.token_id)
    return _plan_out(study.study.key, plan)


def _visible(session: SessionDep, analysis_id: uuid.UUID, principal: Principal) -> tuple[Analysis, str]:
    job, key = service.get(session, analysis_id)
    if not principal.may_access_study(job.study_id):
        raise Forbidden("this token is limited to another study")
    return job, key


@router.get("/api/v1/analyses/{analysis_id}", response_model=AnalysisOut, summary="An analysis and its results")
def get_analysis(analysis_id: uuid.UUID, principal: Reader, session: SessionDep) -> AnalysisOut:
    return to_out(*_visible(session, analysis_id, principal))


@router.get("/api/v1/analyses/{analysis_id}/report", response_class=HTMLResponse,
            summary="The results as a readable HTML table (the same numbers)")
def report(analysis_id: uuid.UUID, principal: Reader, session: SessionDep) -> HTMLResponse:
    job, key = _visible(session, analysis_id, principal)
    return HTMLResponse(report_html(job, key, service.wave_keys(session, key)))


@router.get("/api/v1/analyses/{analysis_id}/frame", summary="The exact data snapshot the fit used",
            response_class=Response,
            responses={200: {"content": {"application/vnd.apache.parquet": {}, "text/csv": {}}}})
def snapshot_frame(analysis_id: uuid.UUID, principal: Analyst, session: SessionDep,
                   format: Annotated[Literal["parquet", "csv"], Query()] = "parquet") -> Response:
    job, _ = _visible(session, analysis_id, principal)
    if job.snapshot_sha256 is None:
        raise Conflict(f"analysis {analysis_id} has no data snapshot yet (status {job.status})")
    from app.analysis import frame as frames  # pandas and pyarrow, only for this download

    snap = service.snapshot(session, job.snapshot_sha256)
    name = f"analysis-{analysis_id}-{snap.sha256[:12]}"
    if format == "parquet":
        return Response(snap.parquet, media_type="application/vnd.apache.parquet",
                        headers={"Content-Disposition": f'attachment; filename="{name}.parquet"'})
    buffer = io.StringIO()
    frames.from_parquet(snap.parquet).to_csv(buffer, index=False)
    return Response(buffer.getvalue(), media_type="text/csv",
                    headers={"Content-Disposition": f'attachment; filename="{name}.csv"'})
