"""Analysis plans and jobs: the rules. SQL is in `repository`; transactions belong to the
request wrapper (`app.core.db.get_session`) and the task wrapper (`tasks.run`).

A request names a model of the study's current plan (optionally a variant) or carries a
one-off `spec`; either is resolved against the codebook into a self-contained spec that is
stored on the job, so the fit reads the plan as it was when asked, and the result names the
plan version. A request on unchanged data and an unchanged spec returns the existing job.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from app.analysis import plan as plans
from app.analysis import repository
from app.analysis.errors import ModelError
from app.analysis.models import Analysis, AnalysisPlan, Snapshot
from app.core.crypto import settings_sealer
from app.core.errors import Conflict, Invalid, NotFound
from app.core.settings import Settings
from app.core.timeutil import utcnow
from app.instruments.codebook import Codebook
from app.responses import service as responses
from app.studies.service import StudyContext, pseudonymiser, system_context
from app.webhooks import service as webhooks
from app.webhooks.schemas import EventType

if TYPE_CHECKING:
    import pandas as pd

    from app.analysis import frame as frames

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3


# -- software ----------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the running code when it is a git checkout (None otherwise), read from
    the repository's files (a worktree's `.git` file, loose or packed refs) without running git."""
    dot_git = Path(__file__).resolve().parents[2] / ".git"
    try:
        gitdir = dot_git
        if dot_git.is_file():
            gitdir = (dot_git.parent / dot_git.read_text().split("gitdir:", 1)[1].strip()).resolve()
        common = gitdir
        if (gitdir / "commondir").is_file():
            common = (gitdir / (gitdir / "commondir").read_text().strip()).resolve()
        head = (gitdir / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head if len(head) == 40 else None
        ref = head[4:].strip()
        for base in (gitdir, common):
            if (base / ref).is_file():
                return (base / ref).read_text().strip()[:40]
        packed = common / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                if line.endswith(" " + ref):
                    return line[:40]
    except (OSError, IndexError):
        return None
    return None


def software() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("statsmodels", "pandas", "numpy", "scipy", "cohort"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "unknown"
    commit = git_commit()
    if commit is not None:
        versions["cohort_git_commit"] = commit
    return versions


# -- plans -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CurrentPlan:
    version: int
    document: dict[str, Any]
    created_at: datetime | None
    created_by: uuid.UUID | None
    stored: bool = True

    @property
    def doc(self) -> plans.PlanDoc:
        parsed: plans.PlanDoc = plans.PlanDoc.model_validate(self.document)
        return parsed


def current_plan(session: Session, ctx: StudyContext) -> CurrentPlan:
    """The newest stored version; before any, the plan the template ships (version 1), or an
    empty plan (version 0) for a study whose codebook has none."""
    stored = repository.latest_plan(session, ctx.study.id)
    if stored is not None:
        return CurrentPlan(stored.version, stored.document, stored.created_at, stored.created_by)
    codebook = ctx.require_codebook()
    shipped = plans.shipped_plan(codebook.key)
    if shipped is not None:
        return CurrentPlan(1, shipped, None, None, stored=False)
    return CurrentPlan(0, {"variables": {}, "models": {}}, None, None, stored=False)


def _kept_plan(session: Session, ctx: StudyContext) -> CurrentPlan:
    """The current plan, stored: the template's plan becomes the study's stored version 1 the
    first time something depends on it (a fit that cites it, or an edit that follows it), so a
    later release shipping another plan never changes what version 1 meant for this study."""
    current = current_plan(session, ctx)
    if current.stored or current.version == 0:
        return current
    repository.keep_first_plan(session, ctx.study.id, current.document, utcnow())
    return current_plan(session, ctx)


def replace_plan(session: Session, ctx: StudyContext, document: dict[str, Any], *, expected_version: int | None,
                 created_by: uuid.UUID | None) -> CurrentPlan:
    """Validate every name against the codebook and store the plan as the next version."""
    codebook = ctx.require_codebook()
    doc: plans.PlanDoc = plans.parse(document, plans.PlanDoc)
    plans.check(doc, codebook)
    current = _kept_plan(session, ctx)
    if expected_version is not None and expected_version != current.version:
        raise Conflict(f"the plan is at version {current.version}, not {expected_version}; "
                       "read it again and apply the change to that version")
    stored = repository.add_plan(session, AnalysisPlan(
        study_id=ctx.study.id, version=current.version + 1, document=doc.model_dump(mode="json", exclude_none=True),
        created_by=created_by, created_at=utcnow()))
    return CurrentPlan(stored.version, stored.document, stored.created_at, stored.created_by)


def resolve_request(session: Session, ctx: StudyContext, *, model: str | None, variant: str | None,
                    spec: dict[str, Any] | None) -> dict[str, Any]:
    codebook = ctx.require_codebook()
    current = current_plan(session, ctx)
    doc = current.doc
    if spec is not None:
        if model is not None or variant is not None:
            raise Invalid("give either a model of the plan or a spec", errors=[
                {"loc": ["spec"], "code": "not_allowed", "message": "spec replaces model and variant"}])
        one_off: plans.SpecDoc = plans.parse(spec, plans.SpecDoc, ("spec",))
        if one_off.variants:
            raise Invalid("a one-off spec has no variants", errors=[
                {"loc": ["spec", "variants"], "code": "not_allowed", "message": "put the terms in `terms`"}])
        plans.check_spec(one_off, doc, codebook)
        variables = {**doc.variables, **one_off.variables}
        return plans.resolve(one_off, variables, None, codebook, key="spec", plan_version=current.version)
    if model is None:
        raise Invalid("name a model of the plan, or give a spec", errors=[
            {"loc": ["model"], "code": "required", "message": "model or spec is required"}])
    found = doc.models.get(model)
    if found is None:
        raise Invalid(f"the plan (version {current.version}) has no model {model!r}", errors=[
            {"loc": ["model"], "code": "unknown_model",
             "message": f"models of the plan: {', '.join(doc.models) or 'none'}"}])
    if variant is not None and variant not in found.variants:
        raise Invalid(f"{model} has no variant {variant!r}", errors=[
            {"loc": ["variant"], "code": "not_allowed",
             "message": f"variants of {model}: {', '.join(found.variants) or 'none'}"}])
    return plans.resolve(found, doc.variables, variant, codebook, key=model, plan_version=current.version)


# -- jobs --------------------------------------------------------------------------------------


# the frame's layout (columns, types, formats) and how its data is fingerprinted: a release that
# changes either never reuses older snapshots
FRAME_FORMAT = 3


def data_fingerprint(session: Session, study_id: uuid.UUID, codebook: Codebook, revision: int | None,
                     as_of: datetime | None) -> str:
    """A cheap fingerprint of everything a fit reads: if it is unchanged, so is the frame (no pandas
    here: the API process answers a request for a fit without importing the frame's libraries)."""
    count, digest = repository.complete_digest(session, study_id, as_of)
    return _data_key(count, digest, codebook, revision, as_of)


def _data_key(count: int, digest: int, codebook: Codebook, revision: int | None, as_of: datetime | None) -> str:
    raw = f"{FRAME_FORMAT}:{count}:{digest}:{frame_basis(codebook, revision, as_of)}"
    return hashlib.sha256(raw.encode()).hexdigest()


def frame_basis(codebook: Codebook, revision: int | None, as_of: datetime | None) -> str:
    """What a frame's columns and rows depend on besides the stored responses: the frame's layout,
    the codebook and the as_of cut. Frames on one basis differ only in rows."""
    raw = f"{FRAME_FORMAT}:{revision}:{codebook.sha256}:{as_of.isoformat() if as_of else '-'}"
    return hashlib.sha256(raw.encode()).hexdigest()


def _fingerprint(data: str, spec: dict[str, Any]) -> str:
    return hashlib.sha256((data + json.dumps(spec, sort_keys=True)).encode()).hexdigest()


def request(session: Session, ctx: StudyContext, *, model: str | None, variant: str | None,
            spec: dict[str, Any] | None, as_of: datetime | None, requested_by: uuid.UUID) -> tuple[Analysis, bool]:
    _kept_plan(session, ctx)  # the version a result cites is a stored one
    resolved = resolve_request(session, ctx, model=model, variant=variant, spec=spec)
    codebook = ctx.require_codebook()
    fingerprint = _fingerprint(data_fingerprint(session, ctx.study.id, codebook, ctx.revision, as_of),
                               resolved)
    variant_key = resolved["variant"] or ""
    existing = repository.reusable(session, ctx.study.id, resolved["key"], variant_key, fingerprint)
    if existing is not None:
        return existing, True
    job = repository.add(session, Analysis(
        study_id=ctx.study.id, model=resolved["key"], variant=variant_key, as_of=as_of, status="queued",
        data_fingerprint=fingerprint, requested_by=requested_by, created_at=utcnow(),
        plan_version=resolved["plan_version"], spec=resolved))
    return job, False


def wave_keys(session: Session, study_key: str) -> list[str]:
    codebook = system_context(session, study_key).codebook
    return list(codebook.wave_keys) if codebook is not None else []


def get(session: Session, analysis_id: uuid.UUID) -> tuple[Analysis, str]:
    found = repository.with_study_key(session, analysis_id)
    if found is None:
        raise NotFound(f"no analysis {analysis_id}")
    return found


def page(session: Session, study_id: uuid.UUID, model: str | None, after: tuple[Any, ...] | None,
         limit: int) -> list[Analysis]:
    return repository.page(session, study_id, model, after, limit)


@dataclass(frozen=True)
class Claim:
    analysis_id: uuid.UUID
    study_id: uuid.UUID
    model: str
    variant: str | None
    as_of: datetime | None
    spec: dict[str, Any] | None


def claim(session: Session, analysis_id: uuid.UUID) -> Claim | None:
    row = repository.claim(session, analysis_id, utcnow())
    if row is None:
        return None
    study_id, model, variant, as_of, spec = row
    return Claim(analysis_id, study_id, model, variant or None, as_of, spec)


def _legacy_variant(variant: str | None) -> str | None:
    return None if variant in (None, "", "model1") else variant  # jobs queued before plans said model1


@dataclass(frozen=True)
class Prepared:
    """What a fit reads: the frame with its row keys, the spec, the data fingerprint taken before the
    frame was read (`store_snapshot` labels the frame with it only if the data still has it), its
    snapshot (None: not stored yet), and the codebook and revision it was read under (its basis)."""

    keyed: frames.Keyed
    spec: dict[str, Any]
    data_key: str | None
    sha: str | None
    codebook: Codebook
    revision: int | None

    @property
    def frame(self) -> pd.DataFrame:
        return self.keyed.frame


def _context(session: Session, job: Claim) -> StudyContext:
    key = repository.study_key(session, job.study_id)
    if key is None:
        raise ModelError("the study no longer exists")
    return system_context(session, key)


def prepare(session: Session, settings: Settings, job: Claim) -> Prepared:
    """The analysis frame and the spec to fit (a job queued before plans gets the current plan's).

    Data that has not changed since a kept snapshot is that snapshot. Otherwise the newest kept
    frame on the same basis is brought up to date: only the responses whose row versions moved are
    read from the database (all of them when most did, or when there is no such frame). A new
    frame is labelled with the data fingerprint when it is stored, only if the data had that
    fingerprint both before and after the read (a response stored meanwhile leaves it
    unlabelled, so it is never reused for other data)."""
    from app.analysis import frame as frames

    ctx = _context(session, job)
    responses.bring_derived_current(session, ctx)  # before the fingerprint, which names the definitions
    codebook = ctx.require_codebook()
    spec = job.spec
    if spec is None:
        spec = resolve_request(session, ctx, model=job.model, variant=_legacy_variant(job.variant), spec=None)
    basis = frame_basis(codebook, ctx.revision, job.as_of)
    now = frames.versions(session, job.study_id, job.as_of)
    # the same count and sum as `repository.complete_digest` (Python ints: the sum never wraps)
    data_key = _data_key(len(now), sum(now["row_version"].tolist()), codebook, ctx.revision, job.as_of)
    kept = repository.snapshot_key_at(session, job.study_id, data_key)
    if kept is not None and (keyed := _kept_frame(session, kept)) is not None:
        return Prepared(keyed, spec, data_key, kept, codebook, ctx.revision)
    base_sha = repository.newest_keyed_snapshot(session, job.study_id, basis)
    base = _kept_frame(session, base_sha) if base_sha is not None else None
    pseudonymise = pseudonymiser(session, ctx.study, settings_sealer(settings))
    keyed = frames.refresh(session, ctx, pseudonymise, as_of=job.as_of, now=now, base=base)
    return Prepared(keyed, spec, data_key, None, codebook, ctx.revision)


def _kept_frame(session: Session, sha: str) -> frames.Keyed | None:
    """A kept snapshot's frame and row keys: from this process's recent frames, else its Parquet
    (None: it kept no row keys, as snapshots before row versions did not)."""
    from app.analysis import frame as frames

    recent = frames.recall(sha)
    if recent is not None:
        return recent
    contents = repository.snapshot_contents(session, sha)
    if contents is None or contents[1] is None:
        return None
    keyed = frames.Keyed(frames.from_parquet(contents[0]), frames.as_keys(frames.from_parquet(contents[1])))
    frames.remember(sha, keyed)
    return frames.recall(sha)


def store_snapshot(session: Session, job: Claim, prepared: Prepared) -> str:
    """Keep the frame a fit used with its row keys, labelled with the data fingerprint if the data
    still has the one it had before the read (versions never repeat, so the same fingerprint now
    means nothing changed in between); remember it in this process. Returns its sha256."""
    from app.analysis import frame as frames

    frame = prepared.frame
    sha = frames.snapshot_sha256(frame)
    data_key = prepared.data_key
    if data_key is not None and data_key != data_fingerprint(session, job.study_id, prepared.codebook,
                                                             prepared.revision, job.as_of):
        data_key = None
    repository.save_snapshot(session, sha256=sha, study_id=job.study_id, rows=len(frame),
                             participants=int(frame["participant"].nunique()), parquet=frames.to_parquet(frame),
                             now=utcnow(), data_key=data_key,
                             basis=frame_basis(prepared.codebook, prepared.revision, job.as_of),
                             row_keys=frames.to_parquet(prepared.keyed.keys))
    frames.remember(sha, prepared.keyed)
    return sha


def fit(job: Claim, spec: dict[str, Any], frame: pd.DataFrame) -> dict[str, Any]:
    """The fit itself (pure: no database); raises ModelError with a message for the PI."""
    from app.analysis.fit import run

    taken_at = job.as_of or utcnow()
    if frame.empty:
        raise ModelError("there are no complete responses to analyse yet")
    return {
        "data": {"n_participants": int(frame["participant"].nunique()), "n_observations": len(frame),
                 "as_of": taken_at.isoformat()},
        "software": software(),
        "results": run(spec, frame),
        "spec": spec, "plan_version": spec.get("plan_version"),
    }


def cite(outcome: dict[str, Any], sha: str) -> None:
    """A fit's outcome names the snapshot it was fitted on."""
    outcome["snapshot_sha256"] = sha
    outcome["data"]["snapshot_sha256"] = sha


def finish(session: Session, analysis_id: uuid.UUID, values: dict[str, Any]) -> None:
    row = repository.finish(session, analysis_id, utcnow(), values)
    if row is not None:
        event: EventType = "analysis.succeeded" if values.get("status") == "succeeded" else "analysis.failed"
        webhooks.emit(session, row.study_id, event,
                      {"analysis_id": str(analysis_id), "model": row.model, "variant": row.variant})


def latest_succeeded(session: Session, study_id: uuid.UUID) -> dict[tuple[str, str], Analysis]:
    """The newest succeeded fit of each (model, variant) of a study."""
    latest: dict[tuple[str, str], Analysis] = {}
    for row in repository.succeeded_newest_first(session, study_id):
        latest.setdefault((row.model, row.variant or ""), row)
    return latest


def snapshot(session: Session, sha256: str) -> Snapshot:
    found = repository.snapshot(session, sha256)
    if found is None:
        raise NotFound("the data snapshot of this analysis is not stored")
    return found


def sweep(session: Session, lease: timedelta) -> tuple[list[uuid.UUID], int]:
    """Jobs whose worker died mid-fit (running past the lease) are queued again, up to
    MAX_ATTEMPTS, then failed with a message; jobs the broker lost are returned to be sent
    again (after the commit). The claim (queued -> running) keeps every job to one fit at a time."""
    now = utcnow()
    given_up = repository.fail_exhausted(session, now - lease, MAX_ATTEMPTS, now,
                                         f"the worker stopped during the fit {MAX_ATTEMPTS} times; request it again")
    for row in given_up:
        webhooks.emit(session, row.study_id, "analysis.failed",
                      {"analysis_id": str(row.id), "model": row.model, "variant": row.variant})
    revived = repository.revive_expired(session, now - lease)
    stuck = repository.queued_before(session, now - min(lease, timedelta(minutes=2)))
    return stuck, revived
