from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal, get_args

from fastapi import APIRouter, Query
from sqlalchemy.orm import Session

from app.audit import repository
from app.audit.models import AUDITED
from app.audit.schemas import AuditOut
from app.core.db import SessionDep
from app.core.pagination import CursorQuery, LimitQuery, Page, decode_cursor, encode_cursor
from app.core.routing import RoleRoute
from app.core.security import AdminOnly, Coordinator, WholeStudy
from app.core.timeutil import Instant
from app.studies.deps import StudyFromPath

router = APIRouter(tags=["audit"], route_class=RoleRoute, dependencies=[WholeStudy])

Table = Literal["studies", "codebooks", "waves", "api_tokens", "participants", "participant_contacts", "schedules",
                "responses", "response_corrections", "reminder_sends", "analysis_plans", "sites",
                "participant_site_moves"]
assert set(get_args(Table)) == {t for t, *_ in AUDITED}


def _page(session: Session, *, study_id: uuid.UUID | None, table: str | None, action: str | None,
          actor: str | None, row_id: str | None, since: datetime | None, until: datetime | None,
          limit: int, cursor: str | None) -> Page[AuditOut]:
    before_id = decode_cursor(cursor, 1)
    rows = repository.page(session, study_id=study_id, table=table, action=action, actor=actor, row_id=row_id,
                           since=since, until=until, limit=limit,
                           before_id=int(before_id[0]) if before_id is not None else None)
    next_cursor = encode_cursor(rows[limit - 1].id) if len(rows) > limit else None
    return Page(items=[AuditOut(id=r.id, at=r.at, actor=r.actor, table=r.table_name, row_id=r.row_id,
                                action=r.action, changed=r.changed, before=r.before, after=r.after)
                       for r in rows[:limit]], next_cursor=next_cursor)


Action = Annotated[Literal["INSERT", "UPDATE", "DELETE"] | None, Query()]
Since = Annotated[Instant | None, Query(description="at or after this instant")]
Until = Annotated[Instant | None, Query(description="before this instant")]


@router.get("/api/v1/studies/{key}/audit", response_model=Page[AuditOut],
            summary="Every change to the study's data: who, when, what, before and after (newest first)")
def study_audit(principal: Coordinator, study: StudyFromPath, session: SessionDep, table: Table | None = None,
                action: Action = None, actor: str | None = None, row_id: str | None = None, since: Since = None,
                until: Until = None, limit: LimitQuery = 100, cursor: CursorQuery = None) -> Page[AuditOut]:
    return _page(session, study_id=study.study.id, table=table, action=action, actor=actor, row_id=row_id,
                 since=since, until=until, limit=limit, cursor=cursor)


@router.get("/api/v1/audit", response_model=Page[AuditOut],
            summary="The whole audit trail, including tokens not tied to a study (admin; a study-scoped admin "
                    "sees its study's entries only)")
def all_audit(principal: AdminOnly, session: SessionDep, table: Table | None = None, action: Action = None,
              actor: str | None = None, row_id: str | None = None, since: Since = None, until: Until = None,
              limit: LimitQuery = 100, cursor: CursorQuery = None) -> Page[AuditOut]:
    return _page(session, study_id=principal.study_id, table=table, action=action, actor=actor, row_id=row_id,
                 since=since, until=until, limit=limit, cursor=cursor)
