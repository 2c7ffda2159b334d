from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    ARRAY,
    LargeBinary,
    String,
    Table,
    any_,
    bindparam,
    delete,
    func,
    literal,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session
from sqlalchemy.sql.expression import Executable

from app.core.db import fold_with_commit, with_commit
from app.idempotency import repository as idempotency_repo
from app.participants import repository as participants_repo
from app.participants.models import Participant
from app.participants.repository import PARTICIPANT_COLUMNS
from app.responses.models import DerivedRecompute, Response, ResponseCorrection
from app.studies.repository import STUDY_COLUMNS
from app.webhooks import repository as webhooks_repo


def for_update(session: Session, participant_id: uuid.UUID, wave: str) -> Response | None:
    return session.scalar(
        select(Response).where(Response.participant_id == participant_id, Response.wave == wave).with_for_update()
    )


def for_participant_wave(session: Session, participant_id: uuid.UUID, wave: str) -> Response | None:
    return session.scalar(select(Response).where(Response.participant_id == participant_id, Response.wave == wave))


def of_participants_at(session: Session, participant_ids: Sequence[uuid.UUID], wave: str) -> list[Response]:
    if not participant_ids:
        return []
    return list(session.scalars(select(Response).where(Response.participant_id.in_(participant_ids),
                                                       Response.wave == wave)))


_responses = cast(Table, Response.__table__)
_STORED_OF = select(_responses.c.wave, _responses.c.status, _responses.c.derived).where(
    _responses.c.participant_id == bindparam("p"))
_INSERT = insert(_responses)


def stored_of_participant(session: Session, participant_id: uuid.UUID) -> dict[str, tuple[str, dict[str, Any]]]:
    """The participant's stored responses: wave -> (status, derived values)."""
    return stored_of_rows(list(session.connection().execute(_STORED_OF, {"p": participant_id})))


def stored_of_rows(rows: Sequence[Sequence[Any]]) -> dict[str, tuple[str, dict[str, Any]]]:
    return {wave: (status, derived) for wave, status, derived in rows}


# POST /responses' first reads in one call (migration c5e8a1f3b926): the study with its codebook
# revision and the token's confirmation, the Idempotency-Key's claim, the participant locked, and
# their stored responses, each read after the one before. One row; the columns named here.
_CLAIM_COLUMNS = ("o_locked", "o_record_id", "o_fingerprint", "o_status_code", "o_sealed_body", "o_created_at")
_OPENED = "SELECT " + ", ".join([  # the names are the tables' own columns, not input
    *(f"(o.o_study).{c}" for c in STUDY_COLUMNS), "o.o_codebook_id", "o.o_revision", "o.o_confirmed",
    *(f"o.{c}" for c in _CLAIM_COLUMNS), *(f"(o.o_participant).{c}" for c in PARTICIPANT_COLUMNS), "o.o_stored"])
_OPEN = text(
    _OPENED + " FROM cohort_submit_open(CAST(:key AS text), CAST(:external_id AS text), CAST(:confirm_token AS uuid), "
      "CAST(:lock AS bigint), CAST(:token AS uuid), CAST(:idempotency_key AS text)) o")


@dataclass(frozen=True)
class Opening:
    """The first reads of a response: the study's row (study columns, codebook id, revision,
    confirmation; None: no such study), the claim's row (None without a key), the participant's row
    (None: no such participant) and the stored responses' rows."""

    study: tuple[Any, ...] | None
    claim: tuple[Any, ...] | None
    participant: tuple[Any, ...] | None
    stored: list[tuple[Any, ...]]


def opening_read(study_key: str, external_id: str, confirm_token: uuid.UUID,
                 claim: Mapping[str, Any] | None) -> tuple[Executable, dict[str, Any]]:
    """The first reads as one statement; `claim` is the parameters of the Idempotency-Key's claim
    (`app.idempotency.repository.claim_read`: lock, token, key), None without a key. Pass the one
    row it returns to `opened`."""
    return _OPEN, {"key": study_key, "external_id": external_id, "confirm_token": confirm_token,
                   "lock": claim["lock"] if claim else None, "token": claim["token"] if claim else None,
                   "idempotency_key": claim["key"] if claim else None}


_OPEN_MANY = text(  # the same columns as _OPEN, a row for each participant in the order given
    _OPENED + " FROM cohort_submit_open_many(CAST(:key AS text), CAST(:external_ids AS text[]), "
    "CAST(:confirm_token AS uuid), CAST(:locks AS bigint[]), CAST(:token AS uuid), "
    "CAST(:idempotency_keys AS text[]), CAST(:lock_wait AS text)) o")


def opening_read_many(study_key: str, token_id: uuid.UUID, confirm_token: uuid.UUID, lock_wait: str,
                      each: Sequence[tuple[str, Mapping[str, Any] | None]]) -> tuple[Executable, dict[str, Any]]:
    """`opening_read` for several participants of one study on behalf of one token, in one statement:
    `each` is (external id, claim parameters or None) in the order to lock them; a row each, in that
    order, for `opened`. A participant's lock is waited for `lock_wait` at most (a PostgreSQL
    interval, such as "1s"); past it the statement fails."""
    return _OPEN_MANY, {"key": study_key, "external_ids": [external_id for external_id, _ in each],
                        "confirm_token": confirm_token, "token": token_id, "lock_wait": lock_wait,
                        "locks": [claim["lock"] if claim else None for _, claim in each],
                        "idempotency_keys": [claim["key"] if claim else None for _, claim in each]}


def opened(row: Sequence[Any], with_claim: bool) -> Opening:
    study_end = len(STUDY_COLUMNS) + 3
    claim_end = study_end + len(_CLAIM_COLUMNS)
    participant = tuple(row[claim_end:claim_end + len(PARTICIPANT_COLUMNS)])
    return Opening(study=tuple(row[:study_end]) if row[0] is not None else None,
                   claim=tuple(row[study_end:claim_end]) if with_claim else None,
                   participant=participant if participant[0] is not None else None,
                   stored=[tuple(r) for r in row[-1]])


_INSERT_IF_ABSENT = (insert(_responses)
                     .on_conflict_do_nothing(index_elements=[_responses.c.participant_id, _responses.c.wave])
                     .returning(_responses.c.id))


def insert_if_absent(session: Session, values: dict[str, Any]) -> bool:
    """A new response, at once; False when the unique (participant, wave) already holds one."""
    return session.connection().execute(_INSERT_IF_ABSENT, values).first() is not None


def insert_with_commit(session: Session, values: dict[str, Any]) -> None:
    """A new response, written with the commit (nothing in the request reads it back): its rollup
    trigger locks rows that every completion of the study takes (see app.core.db.with_commit).
    The caller holds the participant's lock and has seen no response at that wave."""
    with_commit(session, _INSERT, values, contended=True)


# A first complete response's writes with the commit (migration d3f7b2a9c541): the webhook event, the
# Idempotency-Key's record (with a key), the response, the wave's schedule completed and the
# participant's status (on the last wave, or back from lost), in the order `with_commit` runs them:
# one statement, each write still a statement of its own in the function, and the COMMIT in one round
# trip. Any other set of writes is sent one statement each.
_CLOSE_PARAMS = (
    "e_study uuid", "e_event text", "e_events varchar[]", "e_ordering uuid", "e_payload jsonb", "e_now timestamptz",
    "e_give_up_at timestamptz",
    "k_id uuid", "k_token_id uuid", "k_key text", "k_method text", "k_path text", "k_fingerprint text",
    "k_status_code integer", "k_sealed_body bytea", "k_resource_id uuid", "k_created_at timestamptz",
    "r_id uuid", "r_study_id uuid", "r_participant_id uuid", "r_wave text", "r_status text", "r_answers jsonb",
    "r_derived jsonb", "r_derived_signature text", "r_codebook_revision integer", "r_late boolean",
    "r_completed_instruments jsonb", "r_completed_at timestamptz", "r_received_at timestamptz",
    "r_updated_at timestamptz", "r_submitted_by uuid",
    "s_p uuid", "s_w text", "s_c timestamptz",
    "p_p uuid", "p_s text",
)
# The same writes for several requests that share a transaction (`app.core.db.commit_together`, migration
# e7a4c2d9f815): each statement once over all of them, their parameters one JSON array; the webhook
# events' `events` is one array for all.
_SHARED = frozenset({"e_events"})
fold_with_commit(
    "SELECT cohort_submit_close(" + ", ".join(
        f"CAST(:{name} AS {pg_type})" for name, pg_type in (p.split(" ") for p in _CLOSE_PARAMS)) + ")",
    [(webhooks_repo.EMIT, "e_", False), (idempotency_repo.STORE, "k_", True), (_INSERT, "r_", False),
     (participants_repo.COMPLETE_WAVE, "s_", False), (participants_repo.SET_STATUS, "p_", True)],
    many=("SELECT cohort_submit_close_many(CAST(:rows AS jsonb), CAST(:e_events AS varchar[]))", _SHARED))


def with_external_id(session: Session, study_id: uuid.UUID, response_id: uuid.UUID, *,
                     for_update: bool = False, site_id: uuid.UUID | None = None) -> tuple[Response, str] | None:
    query = (
        select(Response, Participant.external_id)
        .join(Participant, Participant.id == Response.participant_id)
        .where(Response.study_id == study_id, Response.id == response_id)
    )
    if site_id is not None:
        query = query.where(Participant.site_id == site_id)
    if for_update:
        # the participant first, as every writer of a participant's rows takes it (submit, withdrawal):
        # a correction and a withdrawal of one participant then run one after the other, so the
        # retention triggers of each see what the other wrote
        session.execute(select(Participant.id).join(Response, Response.participant_id == Participant.id)
                        .where(Response.study_id == study_id, Response.id == response_id)
                        .with_for_update(of=Participant, key_share=True))  # FOR NO KEY UPDATE
        query = query.with_for_update(of=Response)
    row = session.execute(query).one_or_none()
    return None if row is None else (row[0], row[1])


# `= ANY(array)` rather than an expanding IN: one SQL text for every call, so nothing is rendered again
_DEPENDENTS = (select(Response).where(Response.participant_id == bindparam("p"),
                                     Response.wave == any_(bindparam("waves", type_=ARRAY(String))))
               .with_for_update())


def dependents(session: Session, participant_id: uuid.UUID, waves: Sequence[str]) -> list[Response]:
    return list(session.scalars(_DEPENDENTS, {"p": participant_id, "waves": list(waves)}))


def of_participant(session: Session, participant_id: uuid.UUID, *, waves: Sequence[str] | None = None,
                   for_update: bool = False) -> list[Response]:
    query = select(Response).where(Response.participant_id == participant_id)
    if waves is not None:
        query = query.where(Response.wave.in_(waves))
    if for_update:
        query = query.with_for_update()
    return list(session.scalars(query))


def page(
    session: Session, *, study_id: uuid.UUID, limit: int, after: tuple[datetime, uuid.UUID] | None,
    external_id: str | None, wave: str | None, status: str | None,
    pseudonym: tuple[str, bytes, bytes] | None = None, site_id: uuid.UUID | None = None,
) -> list[tuple[Response, str]]:
    """`pseudonym`: (pseudonym, inner pad, outer pad); the HMAC is computed in SQL (see Pseudonymiser.sql_pads)."""
    query = (
        select(Response, Participant.external_id)
        .join(Participant, Participant.id == Response.participant_id)
        .where(Response.study_id == study_id)
        .order_by(Response.received_at, Response.id)
        .limit(limit + 1)
    )
    if after is not None:
        query = query.where(tuple_(Response.received_at, Response.id) > tuple_(*after))
    if external_id is not None:
        query = query.where(Participant.external_id == external_id)
    if pseudonym is not None:
        value, inner, outer = pseudonym
        message = func.convert_to(Participant.external_id, "UTF8")
        digest = func.sha256(literal(outer, LargeBinary).op("||")(
            func.sha256(literal(inner, LargeBinary).op("||")(message))))
        query = query.where(func.left(func.encode(digest, "hex"), len(value)) == value)
    if wave is not None:
        query = query.where(Response.wave == wave)
    if status is not None:
        query = query.where(Response.status == status)
    if site_id is not None:
        query = query.where(Participant.site_id == site_id)
    return [(r, ext) for r, ext in session.execute(query).all()]


def corrections_of(session: Session, response_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, list[ResponseCorrection]]:
    out: dict[uuid.UUID, list[ResponseCorrection]] = {rid: [] for rid in response_ids}
    if not response_ids:
        return out
    rows = session.scalars(
        select(ResponseCorrection).where(ResponseCorrection.response_id.in_(response_ids))
        .order_by(ResponseCorrection.created_at)
    )
    for row in rows:
        out[row.response_id].append(row)
    return out


def participants_with_stale_derived(session: Session, study_id: uuid.UUID, signature: str,
                                    limit: int) -> list[uuid.UUID]:
    return list(session.scalars(
        select(Response.participant_id).where(Response.study_id == study_id,
                                              Response.derived_signature != signature)
        .group_by(Response.participant_id).limit(limit)
    ))


def participants_by_external_id(session: Session, study_id: uuid.UUID, external_ids: set[str],
                                site_id: uuid.UUID | None = None) -> dict[str, Participant]:
    if not external_ids:
        return {}
    query = select(Participant).where(Participant.study_id == study_id,
                                      Participant.external_id.in_(sorted(external_ids)))
    rows = session.scalars(query.where(Participant.site_id == site_id) if site_id is not None else query)
    return {p.external_id: p for p in rows}


def existing_waves(session: Session, participant_ids: Sequence[uuid.UUID]) -> set[tuple[uuid.UUID, str]]:
    if not participant_ids:
        return set()
    rows = session.execute(select(Response.participant_id, Response.wave)
                           .where(Response.participant_id.in_(participant_ids)))
    return {(pid, wave) for pid, wave in rows}


def derived_by_wave(session: Session,
                    participant_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, dict[str, dict[str, Any]]]:
    out: dict[uuid.UUID, dict[str, dict[str, Any]]] = {}
    if not participant_ids:
        return out
    rows = session.execute(select(Response.participant_id, Response.wave, Response.derived)
                           .where(Response.participant_id.in_(participant_ids)))
    for pid, wave, derived in rows:
        out.setdefault(pid, {})[wave] = derived
    return out


def insert_many(session: Session, rows: list[dict[str, Any]]) -> None:
    for start in range(0, len(rows), 1000):
        session.execute(insert(Response), rows[start:start + 1000])


def delete_of_participant(session: Session, participant_id: uuid.UUID) -> None:
    """Under a delete-on-withdrawal policy; the audit trail records the deletion, not the answers."""
    session.execute(select(func.set_config("cohort.redact_deleted", "on", True)))
    session.execute(delete(Response).where(Response.participant_id == participant_id))
    session.execute(select(func.set_config("cohort.redact_deleted", "off", True)))


def request_recompute(session: Session, study_id: uuid.UUID, at: datetime) -> None:
    session.execute(insert(DerivedRecompute).values(study_id=study_id, requested_at=at, lease_expires_at=None)
                    .on_conflict_do_update(index_elements=[DerivedRecompute.study_id],
                                           set_={"requested_at": at, "lease_expires_at": None}))


def claim_recompute(session: Session, now: datetime, lease_expires_at: datetime) -> uuid.UUID | None:
    """One study with due recompute work whose lease is free; its lease is taken."""
    study_id = session.scalar(
        select(DerivedRecompute.study_id)
        .where(or_(DerivedRecompute.lease_expires_at.is_(None), DerivedRecompute.lease_expires_at < now))
        .order_by(DerivedRecompute.requested_at).limit(1).with_for_update(skip_locked=True))
    if study_id is not None:
        session.execute(update(DerivedRecompute).where(DerivedRecompute.study_id == study_id)
                        .values(lease_expires_at=lease_expires_at))
    return study_id


def finish_recompute(session: Session, study_id: uuid.UUID, requested_before: datetime) -> None:
    """Done, unless another revision asked again meanwhile (then it stays due)."""
    session.execute(delete(DerivedRecompute).where(DerivedRecompute.study_id == study_id,
                                                   DerivedRecompute.requested_at <= requested_before))
