"""Studies: creation from a template or an uploaded codebook, and the study a request acts on."""

from __future__ import annotations

import base64
import uuid
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, Literal

from sqlalchemy.orm import Session

from app.core.crypto import DateShifter, Pseudonymiser, Sealer, new_pseudonym_key
from app.core.db import add_unique, confirmed, confirming
from app.core.errors import Conflict, Invalid, NotFound
from app.core.security import Principal
from app.core.timeutil import zone
from app.instruments.codebook import Codebook, load_codebook, parse_codebook, template_document
from app.instruments.models import CodebookRevision
from app.studies import repository
from app.studies.models import Study, Wave
from app.studies.schemas import CodebookRef, ExportDates, Language, StudyCreate, StudyOut, StudyUpdate, WithdrawalPolicy


@dataclass(frozen=True)
class StudyContext:
    study: Study
    codebook: Codebook | None
    revision: int | None
    # The site the request is limited to (a site-scoped token), else None: every participant
    # lookup and list filters on it, so another site's participants do not exist for it.
    site_id: uuid.UUID | None = None

    def require_codebook(self) -> Codebook:
        if self.codebook is None:
            raise Invalid(f"study {self.study.key!r} has no codebook yet")
        return self.codebook


_compiled: OrderedDict[uuid.UUID, Codebook] = OrderedDict()
_COMPILED_MAX = 64


def _codebook(session: Session, codebook_id: uuid.UUID) -> Codebook:
    """A stored revision, compiled once per process (revisions are immutable)."""
    codebook = _compiled.get(codebook_id)
    if codebook is None:
        codebook = load_codebook(repository.codebook_document(session, codebook_id))
        _compiled[codebook_id] = codebook
        if len(_compiled) > _COMPILED_MAX:
            _compiled.popitem(last=False)
    return codebook


def system_context(session: Session, key: str) -> StudyContext:
    """The study as a background task sees it (no token, no scope).

    As the first statement of a request's transaction, it also confirms the request's token
    (app.core.db.confirming): one round trip for both.
    """
    confirmation = confirming(session)
    row = repository.with_revision(session, key, confirmation)
    if row is None:
        raise NotFound(f"no study {key!r}")
    study, codebook_id, revision, confirmed_as = row
    if confirmation is not None:
        confirmed(session, confirmed_as)
    return StudyContext(study, _codebook(session, codebook_id) if codebook_id is not None else None, revision)


def confirmation_to_carry(session: Session) -> uuid.UUID | None:
    """The request token's id, for a caller whose transaction starts with a statement that confirms
    it (and names it as the audit actor) itself; None when there is nothing to confirm or the
    transaction has begun (see `app.core.db.confirming`). The caller passes the confirmation's value
    to `context_of_row`."""
    confirmation = confirming(session)
    return None if confirmation is None else confirmation.params["confirm_token"]


def context_of_row(session: Session, key: str, row: tuple[Any, ...] | None, principal: Principal) -> StudyContext:
    """The study of a read carrying the token's confirmation (a row of the study's columns, its codebook's
    id and revision, the confirmation; None: no such study): checks the confirmation and scope as
    `context` does."""
    if row is None:
        raise NotFound(f"no study {key!r}")
    width = len(repository.STUDY_COLUMNS)
    study = Study(**dict(zip(repository.STUDY_COLUMNS, row[:width], strict=True)))  # read only, never added
    codebook_id, revision, confirmed_as = row[width:]
    confirmed(session, confirmed_as)
    ctx = StudyContext(study, _codebook(session, codebook_id) if codebook_id is not None else None, revision)
    principal.require_study(ctx.study.id)
    return replace(ctx, site_id=principal.site_id) if principal.site_id is not None else ctx


def study_id_of_key(session: Session, key: str) -> uuid.UUID:
    study_id = repository.id_of(session, key)
    if study_id is None:
        raise NotFound(f"no study {key!r}")
    return study_id


def study_key_of(session: Session, study_id: uuid.UUID) -> str:
    key = repository.key_of(session, study_id)
    if key is None:
        raise NotFound(f"no study {study_id}")
    return key


def context(session: Session, key: str, principal: Principal) -> StudyContext:
    ctx = system_context(session, key)
    principal.require_study(ctx.study.id)
    return replace(ctx, site_id=principal.site_id) if principal.site_id is not None else ctx


def replace_codebook(session: Session, ctx: StudyContext, document: Any, has_participants: bool) -> StudyContext:
    """Install a new codebook revision. Waves are fixed once anyone is enrolled (schedules hang on them)."""
    codebook = parse_codebook(document)
    if ctx.codebook is not None and codebook.sha256 == ctx.codebook.sha256:
        return ctx
    if has_participants and ctx.codebook is not None:
        before = {w["key"]: w for w in ctx.codebook.waves()}
        after = {w["key"]: w for w in codebook.waves()}
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        if changed:
            raise Conflict(
                "waves cannot change once participants are enrolled",
                errors=[{"loc": ["waves", k], "code": "wave_changed", "message": f"wave {k!r} differs"}
                        for k in changed],
            )
    revision = install_codebook(session, ctx.study, codebook)
    return StudyContext(ctx.study, codebook, revision)


def create(session: Session, data: StudyCreate, sealer: Sealer) -> StudyContext:
    zone(data.timezone, loc=["timezone"])
    if data.template and data.codebook:
        raise Invalid("give either a template or a codebook, not both",
                      errors=[{"loc": ["codebook"], "code": "conflict", "message": "template is also set"}])
    document: dict[str, Any] | None = None
    if data.template:
        document = template_document(data.template)
    elif data.codebook is not None:
        document = data.codebook
    codebook = parse_codebook(document, loc_prefix=("codebook",)) if document is not None else None

    study = Study(key=data.key, name=data.name, timezone=data.timezone, template=data.template, settings={},
                  pseudonym_key=sealer.seal({"key": base64.b64encode(new_pseudonym_key()).decode()}))
    add_unique(session, study, f"a study with key {data.key!r} already exists")
    revision = install_codebook(session, study, codebook) if codebook is not None else None
    return StudyContext(study, codebook, revision)


def install_codebook(session: Session, study: Study, codebook: Codebook) -> int:
    """Store a codebook revision and (re)create the study's waves from it."""
    current = repository.latest_codebook(session, study.id)
    revision = 1 if current is None else current.revision + 1
    session.add(CodebookRevision(
        study_id=study.id, revision=revision, document=codebook.document, sha256=codebook.sha256,
        derived_signature=codebook.derived_signature,
    ))
    existing = {w.key: w for w in repository.waves(session, study.id)}
    policy = codebook.reminder_policy()
    for position, w in enumerate(codebook.waves()):
        wave = existing.get(w["key"]) or Wave(study_id=study.id, key=w["key"])
        wave.label = w["label"]
        wave.position = position
        wave.offset_days = w["offset_days"]
        wave.window_open_days = w["window_open_days"]
        wave.window_close_days = w["window_close_days"]
        if not wave.reminder_policy:
            wave.reminder_policy = dict(policy)
        session.add(wave)
    session.flush()
    return revision


def _study_key(session: Session, study: Study, sealer: Sealer, name: Literal["pseudonym_key", "date_shift_key"],
               ) -> bytes:
    """One of the study's random keys, made on first use, once, and kept sealed."""
    sealed: bytes | None = getattr(study, name)
    if sealed is None:
        sealed = repository.set_key(session, study.id, name, sealer.seal(
            {"key": base64.b64encode(new_pseudonym_key()).decode()}))
    return base64.b64decode(sealer.open(sealed)["key"])


def pseudonymiser(session: Session, study: Study, sealer: Sealer) -> Pseudonymiser:
    """The study's pseudonym function; a study created before keys existed gets one now, once."""
    return Pseudonymiser(_study_key(session, study, sealer, "pseudonym_key"))


def date_shifter(session: Session, study: Study, sealer: Sealer) -> DateShifter:
    """The study's date-shift function (its own key, apart from the pseudonyms')."""
    return DateShifter(_study_key(session, study, sealer, "date_shift_key"))


def export_dates(study: Study) -> ExportDates:
    dates: ExportDates = (study.settings or {}).get("export_dates", "exact")
    return dates


def remember_simulation(session: Session, ctx: StudyContext, truth: dict[str, Any]) -> None:
    study = session.get(Study, ctx.study.id)
    assert study is not None
    simulations = dict((study.settings or {}).get("simulations", {}))
    simulations[str(truth["seed"])] = truth
    study.settings = {**(study.settings or {}), "simulations": simulations}
    session.flush()


def withdrawal_policy(study: Study) -> WithdrawalPolicy:
    policy: WithdrawalPolicy = (study.settings or {}).get("withdrawal_policy", "keep_responses")
    return policy


def update(session: Session, ctx: StudyContext, data: StudyUpdate) -> StudyContext:
    study = session.get(Study, ctx.study.id)
    assert study is not None
    if data.name is not None:
        study.name = data.name
    if data.withdrawal_policy is not None:
        study.settings = {**(study.settings or {}), "withdrawal_policy": data.withdrawal_policy}
    if data.language is not None:
        study.settings = {**(study.settings or {}), "language": data.language}
    if data.contact is not None:
        study.settings = {**(study.settings or {}), "contact": data.contact.strip() or None}
    if data.export_dates is not None:
        study.settings = {**(study.settings or {}), "export_dates": data.export_dates}
    session.flush()
    return StudyContext(study, ctx.codebook, ctx.revision)


def survey_language(study: Study) -> Language:
    return "es" if (study.settings or {}).get("language") == "es" else "en"


def to_out(ctx: StudyContext) -> StudyOut:
    cb = ctx.codebook
    return StudyOut(
        id=ctx.study.id, key=ctx.study.key, name=ctx.study.name, timezone=ctx.study.timezone,
        template=ctx.study.template,
        codebook=CodebookRef(key=cb.key, version=cb.version, revision=ctx.revision or 1, sha256=cb.sha256)
        if cb is not None else None,
        waves=list(cb.wave_keys) if cb is not None else [],
        withdrawal_policy=withdrawal_policy(ctx.study),
        language=survey_language(ctx.study), contact=(ctx.study.settings or {}).get("contact"),
        export_dates=export_dates(ctx.study),
        created_at=ctx.study.created_at,
    )
