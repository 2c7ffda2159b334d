"""Retention, the follow-up worklist and outcomes: the numbers coordinators and PIs read.

The counting is SQL (`repository.py`, with the rollup the triggers keep); here is what is made
of it: rates, Wilson intervals, and the reports the API and the dashboard both serve.
"""

from __future__ import annotations

import math
import uuid
from datetime import datetime
from typing import Any, Literal

from sqlalchemy.orm import Session

from app.retention import repository
from app.retention.schemas import GroupRetention, OutcomeRow, Outcomes, Retention
from app.studies.service import StudyContext

UNKNOWN_GROUP = repository.UNKNOWN_GROUP


def retention(session: Session, study_id: uuid.UUID, waves: list[str], as_of: datetime,
              by: str | None = None, *, rollup: bool = True,
              site_id: uuid.UUID | None = None) -> dict[str | None, list[dict[str, Any]]]:
    return repository.retention(session, study_id, waves, as_of, by, rollup=rollup, site_id=site_id)


def open_windows(session: Session, study_id: uuid.UUID, now: datetime,
                 site_id: uuid.UUID | None = None) -> dict[str, int]:
    return repository.open_windows(session, study_id, now, site_id)


def followup(session: Session, study_id: uuid.UUID, *, wave: str, status: str | None, now: datetime,
             limit: int, offset: int, site_id: uuid.UUID | None = None) -> list[Any]:
    return repository.followup(session, study_id, wave=wave, status=status, now=now, limit=limit, offset=offset,
                               site_id=site_id)


def enrolment_by_month(session: Session, study_id: uuid.UUID, zone: str,
                       site_id: uuid.UUID | None = None) -> list[tuple[str, int]]:
    return repository.enrolment_by_month(session, study_id, zone, site_id)


def wilson(successes: int, n: int) -> tuple[float | None, float | None]:
    if n == 0:
        return None, None
    from statsmodels.stats.proportion import proportion_confint  # heavy import, only when asked

    low, high = proportion_confint(successes, n, alpha=0.05, method="wilson")
    return float(low), float(high)


def outcomes(session: Session, study_id: uuid.UUID, waves: list[str], as_of: datetime, by: str,
             site_id: uuid.UUID | None = None) -> list[dict[str, Any]]:
    """Abstinence (derived abstinent_30d) per wave and baseline group, with 95 % Wilson intervals."""
    rows = repository.outcome_counts(session, study_id, waves[0], as_of, by, site_id)
    order = {w: i for i, w in enumerate(waves)}
    out = []
    for row in sorted(rows, key=lambda r: (order.get(r.wave, math.inf), str(r.grp))):
        low, high = wilson(int(row.abstinent), int(row.n))
        out.append({"wave": row.wave, "group": row.grp, "n": int(row.n), "abstinent": int(row.abstinent),
                    "rate": row.abstinent / row.n if row.n else None, "ci_low": low, "ci_high": high})
    return out


def retention_report(session: Session, study: StudyContext, when: datetime,
                     by: Literal["primary_group", "site"] | None = None) -> Retention:
    """Retention per wave as of `when` (overall, and per group with `by`): the API's and the dashboard's.
    A site-scoped request counts its site's participants only."""
    waves = list(study.require_codebook().wave_keys)
    overall, groups = repository.overall_and_groups(session, study.study.id, waves, when, by, site_id=study.site_id)
    body = Retention(as_of=when, waves=overall)
    if by is not None:
        body.by = by
        body.groups = [GroupRetention(group=str(g), waves=rows) for g, rows in groups.items()]
    return body


def outcomes_report(session: Session, study: StudyContext, when: datetime,
                    by: Literal["online_30d", "primary_group", "site"]) -> Outcomes:
    rows = outcomes(session, study.study.id, list(study.require_codebook().wave_keys), when, by, study.site_id)
    return Outcomes(as_of=when, by=by, items=[OutcomeRow(**r) for r in rows])
