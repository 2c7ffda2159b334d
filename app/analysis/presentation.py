"""How an analysis is shown: the API's JSON and the numbers of the HTML report and the dashboard."""

from __future__ import annotations

from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape

from app.analysis.models import Analysis
from app.analysis.schemas import AnalysisData, AnalysisOut

_templates = Environment(loader=PackageLoader("app", "templates"), autoescape=select_autoescape(["html"]))


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


def report_html(job: Analysis, study_key: str, waves: list[str]) -> str:
    """The results as a readable HTML page (the API's `/report` and the dashboard's alike);
    observations by wave in the codebook's order (stored JSON keeps no order)."""
    out = to_out(job, study_key)
    results = dict(job.results or {})
    if isinstance(results.get("n_by_wave"), dict):
        counts = results["n_by_wave"]
        results["n_by_wave"] = {w: counts[w] for w in [*waves, *sorted(counts)] if w in counts}
    title = str(results.get("label") or job.model)
    return _templates.get_template("report.html").render(
        title=title, study=study_key, id=job.id, status=job.status, error=job.error, data=out.data,
        software=job.software, results=results or None, fmt=fmt_number, pfmt=fmt_p)
