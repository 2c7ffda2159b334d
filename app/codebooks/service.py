"""A new codebook revision for a study.

Waves are fixed once anyone is enrolled (their schedules hang on them), so this needs to know
about participants; a change of derived definitions leaves due work for the responses domain.
That is why it sits above studies, participants and responses rather than inside studies.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from app.participants import service as participants
from app.responses import service as responses
from app.studies import service as studies
from app.studies.service import StudyContext


def install_revision(session: Session, ctx: StudyContext, document: Any, now: datetime) -> tuple[StudyContext, bool]:
    """Returns the study under its new codebook, and whether stored derived values must be recomputed."""
    previous = ctx.codebook.derived_signature if ctx.codebook is not None else None
    new = studies.replace_codebook(session, ctx, document, participants.any_enrolled(session, ctx.study.id))
    assert new.codebook is not None
    stale = previous is not None and new.codebook.derived_signature != previous
    if stale:
        responses.request_recompute(session, ctx.study.id, now)
    return new, stale
