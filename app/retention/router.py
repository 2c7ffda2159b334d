from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query

from app.core.db import SessionDep
from app.core.pagination import CursorQuery, LimitQuery, decode_cursor, encode_cursor
from app.core.routing import RoleRoute
from app.core.security import Coordinator, Reader
from app.core.timeutil import Instant, utcnow
from app.participants.schemas import ScheduleStatus
from app.retention import service
from app.retention.schemas import FollowupItem, FollowupPage, Outcomes, Retention
from app.studies.deps import StudyFromPath

router = APIRouter(prefix="/api/v1/studies/{key}", tags=["retention"], route_class=RoleRoute)

AsOf = Annotated[Instant | None, Query(description="RFC 3339 instant; default now")]


@router.get("/retention", response_model=Retention, summary="Retention per wave as of an instant")
def get_retention(principal: Reader, study: StudyFromPath, session: SessionDep, as_of: AsOf = None,
                  by: Annotated[Literal["primary_group", "site"] | None, Query()] = None) -> Retention:
    return service.retention_report(session, study, as_of or utcnow(), by)


@router.get("/followup", response_model=FollowupPage,
            summary="Coordinator worklist: a wave's participants, windows closing soonest first")
def get_followup(principal: Coordinator, study: StudyFromPath, session: SessionDep,
                 wave: Annotated[str, Query(description="wave key")],
                 status: ScheduleStatus | None = None, limit: LimitQuery = 100,
                 cursor: CursorQuery = None) -> FollowupPage:
    offset = int((decode_cursor(cursor, 1) or [0])[0])
    rows = service.followup(session, study.study.id, wave=wave, status=status, now=utcnow(), limit=limit,
                            offset=offset, site_id=study.site_id)
    next_cursor = encode_cursor(offset + limit) if len(rows) > limit else None
    items = [FollowupItem(external_id=r.external_id, participant_status=r.status, wave=r.wave,
                          wave_status=r.wave_status, opens_at=r.opens_at, closes_at=r.closes_at,
                          completed_at=r.completed_at, last_reminder_at=r.last_reminder_at,
                          last_reminder_kind=r.last_reminder_kind, timezone=r.timezone) for r in rows[:limit]]
    return FollowupPage(items=items, next_cursor=next_cursor)


@router.get("/outcomes", response_model=Outcomes,
            summary="Abstinence per wave by baseline online attendance or primary group (95 % Wilson CI)")
def get_outcomes(principal: Reader, study: StudyFromPath, session: SessionDep,
                 by: Annotated[Literal["online_30d", "primary_group", "site"], Query()] = "online_30d",
                 as_of: AsOf = None) -> Outcomes:
    return service.outcomes_report(session, study, as_of or utcnow(), by)
