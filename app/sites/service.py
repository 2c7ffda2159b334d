"""Sites: partitions of a study. A participant belongs to at most one; a token may be limited to one.

A study without sites behaves as it did before sites existed: nobody has a site, and no token
is limited to one.
"""

from __future__ import annotations

import uuid

from sqlalchemy.orm import Session

from app.core.db import add_unique
from app.core.errors import Invalid
from app.core.timeutil import zone
from app.sites import repository
from app.sites.models import Site
from app.sites.schemas import SiteIn, SiteOut


def create(session: Session, study_id: uuid.UUID, data: SiteIn) -> Site:
    if data.timezone is not None:
        zone(data.timezone, loc=["timezone"])
    site = Site(study_id=study_id, key=data.key, name=data.name, timezone=data.timezone)
    add_unique(session, site, f"the study already has a site {data.key!r}")
    return site


def of_study(session: Session, study_id: uuid.UUID) -> list[Site]:
    return repository.of_study(session, study_id)


def keys_of(session: Session, study_id: uuid.UUID) -> dict[uuid.UUID, str]:
    """Site id -> key for a study (what exports and lists show: the key, never more)."""
    return repository.keys_of(session, study_id)


def key_of(session: Session, site_id: uuid.UUID | None) -> str | None:
    site = repository.get(session, site_id) if site_id is not None else None
    return site.key if site is not None else None


def resolve(session: Session, study_id: uuid.UUID, key: str, loc: list[str | int]) -> Site:
    """A site of the study named by key; an unknown key is a 422 naming the field."""
    site = repository.by_key(session, study_id, key)
    if site is None:
        raise Invalid(f"the study has no site {key!r}",
                      errors=[{"loc": loc, "code": "unknown_site", "message": f"no site {key!r} in this study"}])
    return site


def to_out(site: Site) -> SiteOut:
    return SiteOut(id=site.id, key=site.key, name=site.name, timezone=site.timezone, created_at=site.created_at)


def get(session: Session, site_id: uuid.UUID) -> Site | None:
    return repository.get(session, site_id)


def by_key(session: Session, study_id: uuid.UUID, key: str) -> Site | None:
    return repository.by_key(session, study_id, key)
