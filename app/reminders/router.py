from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Path, Query
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from app.core.db import DatabaseDep, SessionDep, on_commit
from app.core.deps import SettingsDep
from app.core.routing import RoleRoute
from app.core.security import Coordinator, WholeStudy
from app.core.timeutil import Instant, utcnow
from app.idempotency.service import IdempotencyDep
from app.participants import service as participants
from app.reminders import repository, service, tasks, templates
from app.reminders.models import ReminderSend
from app.reminders.schemas import (
    Funnel,
    FunnelWave,
    PolicyIn,
    RunResult,
    SendList,
    SendNowIn,
    SendOut,
    TemplateIn,
    TemplateOut,
)
from app.studies.deps import StudyFromPath
from app.studies.schemas import WaveOut

router = APIRouter(prefix="/api/v1/studies/{key}", tags=["reminders"], route_class=RoleRoute)


@router.post("/reminders:run", dependencies=[WholeStudy], response_model=RunResult,
             summary="Run the reminder scan now, with an explicit clock",
             description="The same scan the periodic task runs, for replaying and testing a study "
                         "deterministically. Sends by SMTP synchronously.")
async def run_reminders(
    principal: Coordinator, study: StudyFromPath, db: DatabaseDep, settings: SettingsDep,
    now: Annotated[Instant | None, Query(description="the clock of this run (RFC 3339); default now")] = None,
) -> RunResult:
    clock = now or utcnow()
    result = await run_in_threadpool(tasks.run_scan, db, settings, clock, study_id=study.study.id,
                                     actor=str(principal.token_id))
    return RunResult(now=clock, **{k: getattr(result, k) for k in
                                   ("sent", "skipped", "failed", "cancelled", "deferred", "retried", "planned")})


def send_out(row: ReminderSend) -> SendOut:
    status = "pending" if row.status in ("sending", "handed_over") else row.status
    return SendOut(wave=row.wave, kind=row.kind, status=status, due_at=row.due_at,
                   sent_at=row.sent_at, attempts=row.attempts, last_error=row.last_error, planned=True)


@router.post("/participants/{external_id}/reminders", status_code=201, response_model=SendOut,
             summary="Send a reminder now (within sending hours; otherwise it waits for the morning)",
             description="One more message for a wave whose window is open, delivered by the worker's scan within "
                         "seconds under the same rules as the scheduled ones: 409 if the participant withdrew, the "
                         "wave is complete or its window is not open. It is returned `pending`; "
                         "`GET .../reminders` shows when it went.")
def send_reminder_now(external_id: str, body: SendNowIn, principal: Coordinator, study: StudyFromPath,
                      session: SessionDep, idem: IdempotencyDep) -> JSONResponse:
    idem.check(body)
    participant = participants.find(session, study, external_id)
    row = service.send_now(session, study.study.id, participant.id, body.wave, utcnow())
    on_commit(session, tasks.scan.delay)  # the row is the guarantee; this starts the worker's scan at once
    return idem.remember(201, send_out(row))


@router.get("/participants/{external_id}/reminders", response_model=SendList,
            summary="Messages to one participant: sent, pending, failed, cancelled")
def participant_reminders(external_id: str, principal: Coordinator, study: StudyFromPath,
                          session: SessionDep) -> SendList:
    participant = participants.find(session, study, external_id)
    rows = repository.of_participant(session, participant.id)
    items = [send_out(r) for r in rows]
    # Windows further ahead are not rows yet: show what the current policy will send.
    items += [SendOut(wave=wave, kind=kind, status="pending", due_at=due, sent_at=None, attempts=0, last_error=None,
                      planned=False)
              for wave, kind, due in service.not_yet_planned(session, study.study.id, participant, rows)]
    items.sort(key=lambda i: (i.due_at, service.kind_rank(i.kind)))
    return SendList(items=items)


@router.put("/waves/{wave}/reminder-policy", dependencies=[WholeStudy], response_model=WaveOut,
            summary="Change a wave's reminder policy (applies to every message not yet sent)")
def put_policy(wave: Annotated[str, Path(max_length=63)], body: PolicyIn, principal: Coordinator,
               study: StudyFromPath, session: SessionDep) -> WaveOut:
    row = service.set_policy(session, study.study, wave, body)
    return WaveOut.model_validate(row, from_attributes=True)


@router.get("/reminder-template", response_model=TemplateOut, summary="The study's email template")
def get_template(principal: Coordinator, study: StudyFromPath) -> TemplateOut:
    custom = (study.study.settings or {}).get("reminder_template")
    return TemplateOut(subject=(custom or {}).get("subject", templates.DEFAULT_SUBJECT),
                       body=(custom or {}).get("body", templates.DEFAULT_BODY),
                       variables=list(templates.VARIABLES), customised=custom is not None)


@router.put("/reminder-template", response_model=TemplateOut, dependencies=[WholeStudy],
            summary="Change the email template (Jinja2, sandboxed; applies to messages not yet sent)")
def put_template(body: TemplateIn, principal: Coordinator, study: StudyFromPath, session: SessionDep) -> TemplateOut:
    service.set_template(session, study.study, body.subject, body.body)
    return TemplateOut(subject=body.subject, body=body.body, variables=list(templates.VARIABLES), customised=True)


@router.get("/reminders/funnel", response_model=Funnel,
            summary="Completions per wave by the message that preceded them")
def get_funnel(principal: Coordinator, study: StudyFromPath, session: SessionDep,
               as_of: Annotated[Instant | None, Query()] = None) -> Funnel:
    when: datetime = as_of or utcnow()
    rows = service.funnel(session, study.study.id, list(study.require_codebook().wave_keys), when, study.site_id)
    return Funnel(as_of=when, waves=[FunnelWave(**r) for r in rows])
