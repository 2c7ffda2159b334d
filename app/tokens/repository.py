from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Connection, String, Table, bindparam, exists, func, select, tuple_
from sqlalchemy import cast as cast_
from sqlalchemy.orm import Session

from app.sites.models import Site
from app.studies.models import Study
from app.tokens.models import ApiToken


def add(session: Session, token: ApiToken) -> ApiToken:
    session.add(token)
    session.flush()
    return token


def get(session: Session, token_id: uuid.UUID) -> ApiToken | None:
    return session.get(ApiToken, token_id)


def hash_exists(session: Session, secret_hash: str) -> bool:
    return bool(session.scalar(select(exists().where(ApiToken.secret_hash == secret_hash))))


def active_admin_exists(session: Session) -> bool:
    return bool(
        session.scalar(select(exists().where(ApiToken.role == "admin", ApiToken.revoked_at.is_(None))))
    )


def page(
    session: Session, *, limit: int, after: tuple[datetime, uuid.UUID] | None, only: uuid.UUID | None = None
) -> list[tuple[ApiToken, str | None, str | None]]:
    """Tokens in creation order, with their study's and site's keys; `only`: those of one study
    (what a scoped admin may see)."""
    query = (
        select(ApiToken, Study.key, Site.key)
        .outerjoin(Study, Study.id == ApiToken.study_id)
        .outerjoin(Site, Site.id == ApiToken.site_id)
        .order_by(ApiToken.created_at, ApiToken.id)
        .limit(limit + 1)
    )
    if after is not None:
        query = query.where(tuple_(ApiToken.created_at, ApiToken.id) > tuple_(*after))
    if only is not None:
        query = query.where(ApiToken.study_id == only)
    return [(token, key, site) for token, key, site in session.execute(query).all()]


_tokens = cast(Table, ApiToken.__table__)
# Built once: the hot path of every authenticated request. It also names the token as the
# transaction's actor for the audit triggers, in the same round trip.
PRINCIPAL = select(_tokens.c.id, _tokens.c.role, _tokens.c.study_id, _tokens.c.site_id,
                   func.set_config("cohort.actor", cast_(_tokens.c.id, String), True)).where(
    _tokens.c.secret_hash == bindparam("digest"), _tokens.c.revoked_at.is_(None))


def principal_row(session: Session, digest: str) -> Any:
    return session.connection().execute(PRINCIPAL, {"digest": digest}).one_or_none()


# The first statement of every transaction of a request whose token this process already knows:
# still live? It names the token as the actor in the same round trip.
_LIVE = select(func.set_config("cohort.actor", cast_(_tokens.c.id, String), True)).where(
    _tokens.c.id == bindparam("id"), _tokens.c.revoked_at.is_(None))


def is_live(connection: Connection, token_id: uuid.UUID) -> bool:
    return connection.execute(_LIVE, {"id": token_id}).first() is not None


# `is_live` as a column of another statement: the actor's id when live, NULL when revoked.
LIVE_ACTOR = select(func.set_config("cohort.actor", cast_(_tokens.c.id, String), True)).where(
    _tokens.c.id == bindparam("confirm_token"), _tokens.c.revoked_at.is_(None)).scalar_subquery()
