"""Responses: validated, merged for partial saves, never duplicated, corrected with an audit of values."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from app.core.db import fetch
from app.core.errors import AlreadyComplete, Conflict, Invalid, NotFound
from app.core.etag import etag_of, require_current
from app.core.security import Principal
from app.idempotency.service import Idempotency
from app.instruments.codebook import Codebook
from app.participants import repository as participants_repo
from app.participants import service as participants
from app.participants.models import Participant
from app.participants.schedule import plan
from app.responses import repository
from app.responses.models import Response, ResponseCorrection
from app.responses.schemas import CorrectionIn, CorrectionOut, ResponseCreated, ResponseIn, ResponseOut
from app.responses.validation import (
    carried_from,
    carried_values,
    check_answers,
    check_complete_instruments,
    compute_derived,
    dependent_waves,
    instrument_states,
    instruments_at,
)
from app.studies import service as studies
from app.studies.service import StudyContext
from app.webhooks import service as webhooks


def _invalid(errors: list[Any]) -> Invalid:
    items = ", ".join(str(e["loc"][-1]) for e in errors[:8])
    return Invalid(f"{len(errors)} answer(s) failed validation: {items}", errors=errors)


def _carried_values(session: Session, codebook: Codebook, participant_id: uuid.UUID, wave: str,
                    responses: Iterable[Response] | None = None) -> dict[str, Any]:
    """Values of derived variables that this wave carries from another (e.g. baseline aud_severity)."""
    if not carried_from(codebook, wave):
        return {}
    rows = list(responses) if responses is not None else repository.of_participant(session, participant_id)
    return carried_values(codebook, wave, {r.wave: r.derived for r in rows})


def _refresh_dependents(session: Session, codebook: Codebook, source: Response,
                        stored_waves: set[str] | None = None) -> None:
    """After a source wave changes, recompute the carried values of the participant's other waves.

    `stored_waves`: the waves known to have a response (when the caller knows), so that a first
    response with nothing after it asks the database nothing.
    """
    waves = dependent_waves(codebook, source.wave)
    if stored_waves is not None:
        waves = tuple(w for w in waves if w in stored_waves)
    if not waves:
        return
    for other in repository.dependents(session, source.participant_id, waves):
        carried = _carried_values(session, codebook, other.participant_id, other.wave, [source])
        other.derived = compute_derived(codebook, other.wave, other.answers, carried)


def _is_late(codebook: Codebook, participant: Participant, wave: str, at: datetime) -> bool:
    """Outside the wave's window; the window is recomputed from enrolment, as the stored schedule was."""
    for window in plan(participant.enrolled_at, participant.timezone, participants.wave_windows(codebook)):
        if window.wave == wave:
            return not window.contains(at)
    return False


def _on_complete(session: Session, ctx: StudyContext, codebook: Codebook, participant: Participant,
                 response: Response) -> None:
    assert response.completed_at is not None
    participants_repo.mark_wave_completed(session, participant.id, response.wave, response.completed_at)
    webhooks.emit(session, ctx.study.id, "response.completed",
                  {"response_id": str(response.id), "wave": response.wave,
                   "completed_at": response.completed_at.isoformat()}, participant_id=participant.id)
    # the wave's pending reminders are cancelled by the database as the schedule completes
    if response.wave == codebook.wave_keys[-1] and participant.status in ("active", "lost"):
        participants_repo.set_status_at_commit(session, participant, "completed")
    elif participant.status == "lost":
        participants_repo.set_status_at_commit(session, participant, "active")  # a late response brings them back


def _require_wave_and_time(codebook: Codebook, data: ResponseIn, now: datetime) -> None:
    if data.wave not in codebook.wave_keys:
        raise Invalid(f"unknown wave {data.wave!r}", errors=[
            {"loc": ["wave"], "code": "unknown_wave", "message": f"waves are {', '.join(codebook.wave_keys)}"}])
    if data.completed_at is not None and data.completed_at > now + participants.CLOCK_SKEW:
        raise Invalid("completed_at is in the future", errors=[
            {"loc": ["completed_at"], "code": "future", "message": "more than 5 minutes ahead of the server"}])


def submit(
    session: Session, ctx: StudyContext, data: ResponseIn, principal: Principal, now: datetime
) -> tuple[ResponseCreated, bool]:
    """Store answers for (participant, wave). Returns the result and whether a row was created."""
    codebook = ctx.require_codebook()
    _require_wave_and_time(codebook, data, now)
    # Locking the participant serialises this against a concurrent withdrawal and against
    # other submissions for the same person, so the checks below stay true until commit.
    participant = participants.find(session, ctx, data.external_id, for_update=True)
    # Read after the participant's lock, so it stays true until commit: every writer of a
    # participant's responses takes that lock first (a bulk import that does not collides on
    # the unique (participant, wave) at commit instead, a 409).
    stored = repository.stored_of_participant(session, participant.id)
    return _store(session, ctx, codebook, participant, stored, data, principal, now)


def submit_reading_first(session: Session, key: str, data: ResponseIn, principal: Principal, idem: Idempotency,
                         now: datetime) -> tuple[ResponseCreated, bool] | None:
    """`submit` for a request that has not read anything yet (the API's POST): the study with the
    token's confirmation, the Idempotency-Key's claim, the participant's lock and their stored
    responses are read in one statement (a server-side call), each after the one before it (so the
    responses are read under the lock), then checked in that order as `submit` and
    `Idempotency.check` would. None when the study read cannot carry the confirmation: then use
    `submit`.
    """
    confirm_token = studies.confirmation_to_carry(session)
    if confirm_token is None:
        return None
    claim = idem.claim_read(data)
    (row,) = fetch(session, *repository.opening_read(key, data.external_id, confirm_token,
                                                     claim[1] if claim is not None else None))
    return submit_opened(session, key, data, principal, idem, now, repository.opened(row, with_claim=claim is not None))


def submit_opened(session: Session, key: str, data: ResponseIn, principal: Principal, idem: Idempotency,
                  now: datetime, first: repository.Opening) -> tuple[ResponseCreated, bool]:
    """`submit_reading_first` once its first reads are in (`first`, for this request's participant and
    Idempotency-Key claim): checked in the order `submit` and `Idempotency.check` would."""
    ctx = studies.context_of_row(session, key, first.study, principal)
    if first.claim is not None:
        idem.settle(first.claim)
    codebook = ctx.require_codebook()
    _require_wave_and_time(codebook, data, now)
    participant = participants.found(ctx, data.external_id, first.participant)
    return _store(session, ctx, codebook, participant, repository.stored_of_rows(first.stored), data, principal, now,
                  insert_at_commit=True)


def _store(session: Session, ctx: StudyContext, codebook: Codebook, participant: Participant,
           stored: Mapping[str, tuple[str, dict[str, Any]]], data: ResponseIn, principal: Principal,
           now: datetime, *, insert_at_commit: bool = False) -> tuple[ResponseCreated, bool]:
    """`submit` once the participant is locked and their stored responses read.

    `insert_at_commit`: a new response is written with the commit, for a request that reads nothing
    of it back (the API's POST); otherwise at once, so the caller's later reads in the transaction
    see it (the FHIR and REDCap adapters, the survey pages)."""
    if participant.status == "withdrawn":
        raise Conflict(f"participant {data.external_id!r} has withdrawn; responses are no longer accepted")
    problems = check_complete_instruments(codebook, data.wave, data.complete_instruments)
    if problems:
        raise Invalid("complete_instruments names instruments not asked at this wave", errors=problems)
    asked = instruments_at(codebook, data.wave)
    completing = asked if data.status == "complete" else tuple(dict.fromkeys(data.complete_instruments))
    finished_at = data.completed_at or now

    def outcome(already: Mapping[str, str]) -> tuple[str, dict[str, str]]:
        """The status after this submission, and the instruments then complete (with their times)."""
        done = {**already, **{i: already.get(i, finished_at.isoformat()) for i in completing}}
        return ("complete" if all(i in done for i in asked) else "partial"), done

    status, done = outcome({})
    completed_at = finished_at if status == "complete" else None
    response: Response | None = None
    stored_waves: set[str] | None = None
    if data.wave not in stored:
        # The usual case, a first submission. Written with the commit where it can be: its rollup
        # trigger locks the study's by-group counts, which every completion of the study queues
        # for, so they are then held for the commit only (see app.core.db.with_commit).
        errors = check_answers(codebook, data.wave, data.answers, data.answers, status, completing)
        if errors:
            raise _invalid(errors)
        carried = (carried_values(codebook, data.wave, {w: derived for w, (_, derived) in stored.items()})
                   if carried_from(codebook, data.wave) else {})
        values = dict(
            id=uuid.uuid4(), study_id=ctx.study.id, participant_id=participant.id, wave=data.wave,
            status=status, answers=data.answers,
            derived=compute_derived(codebook, data.wave, data.answers, carried),
            derived_signature=codebook.derived_signature, codebook_revision=ctx.revision or 1,
            late=_is_late(codebook, participant, data.wave, completed_at or now), completed_instruments=done,
            completed_at=completed_at, received_at=now, updated_at=now, submitted_by=principal.token_id,
        )
        if insert_at_commit:
            repository.insert_with_commit(session, values)
        if insert_at_commit or repository.insert_if_absent(session, values):
            response = Response(**values)
            stored_waves = set(stored)
        # else a writer that does not take the participant's lock (a bulk import) stored it meanwhile: merged below
    created = response is not None
    if response is None:
        existing = repository.for_update(session, participant.id, data.wave)
        assert existing is not None, "a stored response stays in place under the participant's lock"
        if existing.status == "complete":
            raise AlreadyComplete(f"the {data.wave} response of {data.external_id!r} is already complete; "
                                  "a coordinator corrects it with PATCH")
        status, done = outcome(existing.completed_instruments or {})
        # A response completed by its last instrument takes that instrument's time, unless the client gave one.
        completed_at = finished_at if status == "complete" else None
        merged = {**existing.answers, **data.answers}
        errors = check_answers(codebook, data.wave, data.answers, merged, status, tuple(done))
        if errors:
            raise _invalid(errors)
        existing.answers = merged
        existing.status = status
        existing.completed_instruments = done
        existing.completed_at = completed_at
        existing.updated_at = now
        existing.derived = compute_derived(codebook, data.wave, merged,
                                           _carried_values(session, codebook, participant.id, data.wave))
        existing.derived_signature = codebook.derived_signature
        existing.codebook_revision = ctx.revision or 1
        existing.late = _is_late(codebook, participant, data.wave, completed_at or now)
        response = existing
    if response.status == "complete":
        _on_complete(session, ctx, codebook, participant, response)
    _refresh_dependents(session, codebook, response, stored_waves)
    session.flush()
    return ResponseCreated(
        id=response.id, external_id=participant.external_id, wave=response.wave,
        status=response.status,
        received_at=response.received_at, completed_at=response.completed_at, late=response.late,
        derived=response.derived, instruments=states_of(codebook, response),
    ), created


def states_of(codebook: Codebook, response: Response) -> dict[str, Any]:
    """The `instruments` map of a stored response."""
    return instrument_states(codebook, response.wave, response.answers, response.completed_instruments or {},
                             response.status)


def instrument_progress(session: Session, codebook: Codebook, participant_ids: list[uuid.UUID],
                        wave: str) -> dict[uuid.UUID, tuple[int, int]]:
    """(instruments complete, instruments asked) at `wave` for each participant; (0, asked) without answers."""
    asked = len(instruments_at(codebook, wave))
    out = dict.fromkeys(participant_ids, (0, asked))
    for r in repository.of_participants_at(session, participant_ids, wave):
        out[r.participant_id] = (sum(1 for v in states_of(codebook, r).values() if v == "complete"), asked)
    return out


def _current_derived(session: Session, codebook: Codebook, response: Response) -> dict[str, Any]:
    """Derived values under the codebook in force; stale rows (older definitions) are recomputed."""
    if response.derived_signature == codebook.derived_signature:
        return response.derived
    carried = _carried_values(session, codebook, response.participant_id, response.wave)
    return compute_derived(codebook, response.wave, response.answers, carried)


def to_out(session: Session, ctx: StudyContext, rows: list[tuple[Response, str]], *, show_external_id: bool,
           pseudonymise: Any) -> list[ResponseOut]:
    codebook = ctx.require_codebook()
    corrections = repository.corrections_of(session, [r.id for r, _ in rows])
    return [
        ResponseOut(
            id=r.id, external_id=ext if show_external_id else None, pseudonym=pseudonymise(ext), wave=r.wave,
            status=r.status,
            answers=r.answers, derived=_current_derived(session, codebook, r), late=r.late,
            instruments=states_of(codebook, r),
            received_at=r.received_at, completed_at=r.completed_at, updated_at=r.updated_at,
            codebook_revision=r.codebook_revision,
            corrections=[CorrectionOut(at=c.created_at, token_id=c.token_id, reason=c.reason, before=c.before,
                                       after=c.after) for c in corrections[r.id]],
        )
        for r, ext in rows
    ]


def get(session: Session, ctx: StudyContext, response_id: uuid.UUID) -> tuple[Response, str]:
    row = repository.with_external_id(session, ctx.study.id, response_id, site_id=ctx.site_id)
    if row is None:
        raise NotFound(f"no response {response_id} in study {ctx.study.key!r}")
    return row


def etag(response: Response) -> str:
    """The stored version: changes with every change of answers, status, derived values or times."""
    return etag_of("response", response.id, response.status, response.answers, response.derived,
                   response.completed_instruments, response.completed_at, response.updated_at, response.late)


def correct(session: Session, ctx: StudyContext, response_id: uuid.UUID, data: CorrectionIn,
            principal: Principal, now: datetime, *, if_match: str | None = None) -> tuple[Response, str]:
    codebook = ctx.require_codebook()
    row = repository.with_external_id(session, ctx.study.id, response_id, for_update=True, site_id=ctx.site_id)
    if row is None:
        raise NotFound(f"no response {response_id} in study {ctx.study.key!r}")
    response, external_id = row
    require_current(if_match, etag(response), "response")  # under the row lock: one of two racing edits wins
    merged = dict(response.answers)
    for code, value in data.answers.items():
        if value is None:
            merged.pop(code, None)
        else:
            merged[code] = value
    errors = check_answers(codebook, response.wave, data.answers, merged, response.status)
    if errors:
        raise _invalid(errors)
    before = _pick(response.answers, data.answers)
    after = _pick(merged, data.answers)
    if before == after:
        return response, external_id
    response.answers = merged
    response.updated_at = now
    carried = _carried_values(session, codebook, response.participant_id, response.wave)
    response.derived = compute_derived(codebook, response.wave, merged, carried)
    response.derived_signature = codebook.derived_signature
    session.add(ResponseCorrection(response_id=response.id, token_id=principal.token_id, reason=data.reason,
                                   before=before, after=after, created_at=now))
    session.flush()
    _refresh_dependents(session, codebook, response)
    session.flush()
    webhooks.emit(session, ctx.study.id, "response.corrected",
                  {"response_id": str(response.id), "wave": response.wave, "items": sorted(data.answers)},
                  participant_id=response.participant_id)
    return response, external_id


def _pick(answers: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    return {k: answers.get(k) for k in keys}


def recompute_stale_derived(session: Session, ctx: StudyContext, *, batch: int = 500) -> int:
    """Recompute stored derived values made under older definitions, a batch of participants at a time.

    Reads never serve stale values (they recompute on the fly); this brings the stored rows,
    which exports and analyses read in bulk, up to date. Returns the number of responses updated.
    """
    codebook = ctx.require_codebook()
    order = {w: i for i, w in enumerate(codebook.wave_keys)}
    updated = 0
    for participant_id in repository.participants_with_stale_derived(session, ctx.study.id,
                                                                     codebook.derived_signature, batch):
        rows = sorted(repository.of_participant(session, participant_id, for_update=True),
                      key=lambda r: order.get(r.wave, len(order)))
        for row in rows:  # source waves first, so carried values are fresh
            row.derived = compute_derived(codebook, row.wave, row.answers,
                                          _carried_values(session, codebook, participant_id, row.wave, rows))
            row.derived_signature = codebook.derived_signature
            updated += 1
    session.flush()
    return updated


def bring_derived_current(session: Session, ctx: StudyContext) -> int:
    """Before a bulk read (an export, an analysis frame): every stored derived value of the
    study computed under the definitions in force, so the bulk reader (`table`) reads them as
    stored and no reader recomputes on its own. Usually nothing is left: the periodic task
    recomputes within a minute of a codebook revision."""
    total = 0
    while done := recompute_stale_derived(session, ctx):
        total += done
    return total


def request_recompute(session: Session, study_id: uuid.UUID, now: datetime) -> None:
    """Due work for the periodic task: this study's stored derived values are out of date."""
    repository.request_recompute(session, study_id, now)


def claim_recompute(session: Session, now: datetime, lease: timedelta) -> uuid.UUID | None:
    return repository.claim_recompute(session, now, now + lease)


def finish_recompute(session: Session, study_id: uuid.UUID, started_at: datetime) -> None:
    repository.finish_recompute(session, study_id, started_at)


# -- bulk submission (imports, the simulator) --------------------------------------------------


@dataclass
class NewResponse:
    external_id: str
    wave: str
    answers: dict[str, Any]
    completed_at: datetime | None = None
    status: str = "complete"


def submit_many(session: Session, ctx: StudyContext, items: list[NewResponse], submitted_by: uuid.UUID | None,
                now: datetime) -> list[dict[str, Any]]:
    """Validate every item as a first submission and store them all, or none.

    Returns the problems (each located at [index, ...]); empty when everything was stored.
    The same checks as `submit`: codebook validation, unknown participant or wave, withdrawn
    participant, an answer already stored for that wave, completion in the future.
    """
    codebook = ctx.require_codebook()
    people = repository.participants_by_external_id(session, ctx.study.id, {i.external_id for i in items},
                                                    ctx.site_id)
    stored = repository.existing_waves(session, [p.id for p in people.values()])
    errors: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    for index, item in enumerate(items):
        problems: list[dict[str, Any]] = []
        person = people.get(item.external_id)
        if item.wave not in codebook.wave_keys:
            problems.append({"loc": ["wave"], "code": "unknown_wave", "message": f"unknown wave {item.wave!r}"})
        if person is None:
            problems.append({"loc": ["external_id"], "code": "unknown_participant",
                             "message": f"no participant {item.external_id!r}"})
        elif person.status == "withdrawn":
            problems.append({"loc": ["external_id"], "code": "withdrawn", "message": "the participant withdrew"})
        elif (person.id, item.wave) in stored or (item.external_id, item.wave) in seen:
            problems.append({"loc": ["wave"], "code": "exists",
                             "message": f"a {item.wave} response is already stored for {item.external_id!r}"})
        if item.completed_at is not None and item.completed_at > now + participants.CLOCK_SKEW:
            problems.append({"loc": ["completed_at"], "code": "future", "message": "completed_at is in the future"})
        if not problems:
            problems = check_answers(codebook, item.wave, item.answers, item.answers, item.status)
        seen.add((item.external_id, item.wave))
        errors.extend({**p, "loc": [index, *p["loc"]]} for p in problems)
    if errors:
        return errors

    order = {w: k for k, w in enumerate(codebook.wave_keys)}
    carried_sources = repository.derived_by_wave(session, [p.id for p in people.values()])
    rows: list[dict[str, Any]] = []
    for item in sorted(items, key=lambda i: (i.external_id, order[i.wave])):
        person = people[item.external_id]
        mine = carried_sources.setdefault(person.id, {})
        derived = compute_derived(codebook, item.wave, item.answers, carried_values(codebook, item.wave, mine))
        mine[item.wave] = derived
        completed_at = (item.completed_at or now) if item.status == "complete" else None
        rows.append(dict(
            id=uuid.uuid4(), study_id=ctx.study.id, participant_id=person.id, wave=item.wave, status=item.status,
            answers=item.answers, derived=derived, derived_signature=codebook.derived_signature,
            codebook_revision=ctx.revision or 1, late=_is_late(codebook, person, item.wave, completed_at or now),
            completed_at=completed_at, received_at=now, updated_at=now, submitted_by=submitted_by,
        ))
    repository.insert_many(session, rows)
    done = [r for r in rows if r["status"] == "complete"]
    participants_repo.complete_waves(session, [(r["participant_id"], r["wave"], r["completed_at"]) for r in done])
    webhooks.emit_many(session, ctx.study.id, "response.completed", [
        (r["participant_id"], {"response_id": str(r["id"]), "wave": r["wave"],
                               "completed_at": r["completed_at"].isoformat()}) for r in done])
    final = codebook.wave_keys[-1]
    participants_repo.set_statuses(
        session,
        finished=[r["participant_id"] for r in done if r["wave"] == final],
        returned=[r["participant_id"] for r in done if r["wave"] != final],
    )
    session.flush()
    return []


def delete_of_participant(session: Session, participant_id: uuid.UUID) -> None:
    """Every response of a participant (a withdrawal under a delete-responses policy)."""
    repository.delete_of_participant(session, participant_id)
