from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.sites.models import Site


def of_study(session: Session, study_id: uuid.UUID) -> list[Site]:
    return list(session.scalars(select(Site).where(Site.study_id == study_id).order_by(Site.key)))


def by_key(session: Session, study_id: uuid.UUID, key: str) -> Site | None:
    return session.scalar(select(Site).where(Site.study_id == study_id, Site.key == key))


def get(session: Session, site_id: uuid.UUID) -> Site | None:
    return session.get(Site, site_id)


def keys_of(session: Session, study_id: uuid.UUID) -> dict[uuid.UUID, str]:
    return {site_id: key for site_id, key in session.execute(
        select(Site.id, Site.key).where(Site.study_id == study_id))}
