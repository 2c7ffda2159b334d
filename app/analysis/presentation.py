"""How an analysis is shown: the API's JSON and the numbers of the HTML report and the dashboard."""

from __future__ import annotations

from typing import Any

from app.analysis.models import Analysis
from app.analysis.schemas import AnalysisData, AnalysisOut


def to_out(job: Analysis, study_key: str) -> AnalysisOut:
    return AnalysisOut(
        id=job.id, study=study_key, model=job.model, variant=job.variant or None, plan_version=job.plan_version,
        status=job.status, spec=job.spec,
        error=job.error, requested_as_of=job.as_of,
        data=AnalysisData(**job.data) if job.data else None, software=job.software, results=job.results,
        created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
    )


def fmt_number(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) else ""


def fmt_p(value: Any) -> str:
    if not isinstance(value, int | float):
        return ""
    return "<0.001" if value < 0.001 else f"{value:.3f}"
