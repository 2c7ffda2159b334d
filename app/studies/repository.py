from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal, cast

from sqlalchemy import ColumnElement, Select, Table, bindparam, select, true, tuple_, update
from sqlalchemy.orm import Session

from app.core.db import Confirmation
from app.instruments.models import CodebookRevision
from app.studies.models import Study, Wave


def by_key(session: Session, key: str) -> Study | None:
    return session.scalar(select(Study).where(Study.key == key))


def id_of(session: Session, key: str) -> uuid.UUID | None:
    return session.scalar(select(Study.id).where(Study.key == key))


def key_of(session: Session, study_id: uuid.UUID) -> str | None:
    return session.scalar(select(Study.key).where(Study.id == study_id))


_latest = (
    select(CodebookRevision.id, CodebookRevision.revision)
    .where(CodebookRevision.study_id == Study.id)
    .order_by(CodebookRevision.revision.desc())
    .limit(1)
    .lateral()
)
_WITH_REVISION = (select(Study, _latest.c.id, _latest.c.revision).outerjoin(_latest, true())
                  .where(Study.key == bindparam("key")))


_confirming: dict[int, tuple[ColumnElement[Any], Select[Any]]] = {}


def _with_revision_confirming(column: ColumnElement[Any]) -> Select[Any]:
    """The lookup carrying a (constant) confirmation column, built once per column."""
    built = _confirming.get(id(column))
    if built is None or built[0] is not column:
        built = _confirming[id(column)] = (column, _WITH_REVISION.add_columns(column))
    return built[1]


def with_revision(session: Session, key: str, confirm: Confirmation | None = None,
                  ) -> tuple[Study, uuid.UUID | None, int | None, Any] | None:
    """The study, the id and revision of its codebook in force, and the value of the request's
    token confirmation when given, in one round trip.

    The document itself is fetched only when this process has not compiled that revision yet
    (revisions never change once stored).
    """
    if confirm is None:
        row = session.execute(_WITH_REVISION, {"key": key}).one_or_none()
    else:
        row = session.execute(_with_revision_confirming(confirm.column), {"key": key, **confirm.params}).one_or_none()
    return None if row is None else (row[0], row[1], row[2], row[3] if confirm is not None else None)


_studies = cast(Table, Study.__table__)
STUDY_COLUMNS = tuple(c.key for c in _studies.c)
def codebook_document(session: Session, codebook_id: uuid.UUID) -> dict[str, Any]:
    return dict(session.scalars(select(CodebookRevision.document).where(CodebookRevision.id == codebook_id)).one())


def latest_codebook(session: Session, study_id: uuid.UUID) -> CodebookRevision | None:
    return session.scalar(
        select(CodebookRevision)
        .where(CodebookRevision.study_id == study_id)
        .order_by(CodebookRevision.revision.desc())
        .limit(1)
    )


def waves(session: Session, study_id: uuid.UUID) -> list[Wave]:
    return list(session.scalars(select(Wave).where(Wave.study_id == study_id).order_by(Wave.position)))


def page(
    session: Session, *, limit: int, after: tuple[datetime, uuid.UUID] | None, only: uuid.UUID | None
) -> list[Study]:
    query = select(Study).order_by(Study.created_at, Study.id).limit(limit + 1)
    if after is not None:
        query = query.where(tuple_(Study.created_at, Study.id) > tuple_(*after))
    if only is not None:
        query = query.where(Study.id == only)
    return list(session.scalars(query))


def set_key(session: Session, study_id: uuid.UUID, name: Literal["pseudonym_key", "date_shift_key"],
            sealed: bytes) -> bytes:
    """Store one of the study's sealed keys unless another request stored it first; return the one in force."""
    column = getattr(Study, name)
    session.execute(update(Study).where(Study.id == study_id, column.is_(None)).values({name: sealed}))
    stored: bytes | None = session.scalars(select(column).where(Study.id == study_id)).one()
    assert stored is not None
    return stored


def visible(session: Session, only: uuid.UUID | None) -> list[Study]:
    """Every study by key, or just `only` (a token limited to one study)."""
    query = select(Study).order_by(Study.key)
    if only is not None:
        query = query.where(Study.id == only)
    return list(session.scalars(query))
