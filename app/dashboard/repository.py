from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, cast

from sqlalchemy import String, Table, bindparam, func, select, update
from sqlalchemy import cast as cast_
from sqlalchemy.orm import Session

from app.dashboard.models import DashboardSession
from app.tokens.models import ApiToken


def start(session: Session, token_id: uuid.UUID) -> uuid.UUID:
    row = DashboardSession(token_id=token_id)
    session.add(row)
    session.flush()
    return row.id


def end(session: Session, session_id: uuid.UUID, at: datetime) -> None:
    session.execute(update(DashboardSession).where(DashboardSession.id == session_id,
                                                   DashboardSession.ended_at.is_(None)).values(ended_at=at))


_tokens = cast(Table, ApiToken.__table__)
_sessions = cast(Table, DashboardSession.__table__)
# The page's principal: the session is open and its token active; names the actor for the audit.
_ACTIVE = (
    select(_tokens.c.id, _tokens.c.role, _tokens.c.study_id, _tokens.c.site_id,
           func.set_config("cohort.actor", cast_(_tokens.c.id, String), True))
    .join(_sessions, _sessions.c.token_id == _tokens.c.id)
    .where(_sessions.c.id == bindparam("session_id"), _sessions.c.ended_at.is_(None),
           _tokens.c.revoked_at.is_(None))
)


def active_principal(session: Session, session_id: uuid.UUID) -> Any:
    return session.connection().execute(_ACTIVE, {"session_id": session_id}).one_or_none()
