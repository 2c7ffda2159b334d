"""Webhooks: subscriptions, the outbox other domains write events into, and the delivery rules.

`emit` is called by the domains where events happen, inside their transaction: the outbox row
commits with the change or not at all. A periodic task (`tasks.deliver`) claims due rows one
at a time (SKIP LOCKED), signs and posts them outside any transaction, and records the outcome:
success, or a retry with exponential backoff until a day has passed; a subscription whose every
delivery failed for a day is disabled. One participant's events go out in the order they were
written: a row is not claimed while an earlier one of the same participant is still open.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from app.core.crypto import Sealer
from app.core.errors import Conflict, FieldError, Invalid, NotFound
from app.core.pagination import Page, decode_cursor, encode_cursor
from app.core.security import Principal
from app.core.timeutil import utcnow
from app.studies import service as studies
from app.studies.models import Study
from app.studies.service import StudyContext
from app.webhooks import repository, signing, urls
from app.webhooks.models import WebhookDelivery, WebhookSubscription
from app.webhooks.schemas import DeliveryOut, EventType, WebhookCreated, WebhookIn, WebhookOut

RETRY_FOR = timedelta(hours=24)
DISABLE_AFTER = timedelta(hours=24)
MAX_BACKOFF = timedelta(hours=1)


def check_url(url: str, *, allow_loopback: bool) -> None:
    try:
        urls.check(url, allow_loopback=allow_loopback)
    except urls.UnsafeURL as exc:
        error: FieldError = {"loc": ["url"], "code": "unsafe_url", "message": str(exc)}
        raise Invalid(f"url: {exc}", errors=[error]) from None


def _out(row: WebhookSubscription) -> WebhookOut:
    return WebhookOut(id=row.id, url=row.url, events=list(row.events), description=row.description,
                      status="disabled" if row.status == "disabled" else "active", disabled_at=row.disabled_at,
                      disabled_reason=row.disabled_reason, created_at=row.created_at)


def create(session: Session, ctx: StudyContext, data: WebhookIn, principal: Principal,
           sealer: Sealer) -> WebhookCreated:
    """The URL must already have passed `check_url`."""
    secret = signing.new_secret()
    row = WebhookSubscription(id=uuid.uuid4(), study_id=ctx.study.id, url=data.url,
                              events=list(dict.fromkeys(data.events)), description=data.description,
                              secret=sealer.seal({"secret": secret}), status="active", created_by=principal.token_id,
                              created_at=utcnow())
    repository.add_subscription(session, row)
    return WebhookCreated(**_out(row).model_dump(), secret=secret)


def list_subscriptions(session: Session, ctx: StudyContext) -> list[WebhookOut]:
    return [_out(r) for r in repository.subscriptions(session, ctx.study.id)]


def _find(session: Session, ctx: StudyContext, subscription_id: uuid.UUID, *,
          for_update: bool = False) -> WebhookSubscription:
    row = repository.subscription(session, ctx.study.id, subscription_id, for_update=for_update)
    if row is None:
        raise NotFound(f"no webhook {subscription_id} in study {ctx.study.key!r}")
    return row


def get(session: Session, ctx: StudyContext, subscription_id: uuid.UUID) -> WebhookOut:
    return _out(_find(session, ctx, subscription_id))


def delete(session: Session, ctx: StudyContext, subscription_id: uuid.UUID) -> None:
    """The subscription and its delivery log go; nothing more is sent to it."""
    _find(session, ctx, subscription_id, for_update=True)
    repository.delete_subscription(session, subscription_id)


def _delivery_out(row: WebhookDelivery) -> DeliveryOut:
    return DeliveryOut(
        id=row.id, webhook_id=signing.message_id(row.id), event=row.event,
        status=row.status,
        attempts=row.attempts, last_error=row.last_error, response_code=row.last_response_code,
        next_attempt_at=row.next_attempt_at if row.status == "pending" else None,
        last_attempt_at=row.last_attempt_at, delivered_at=row.delivered_at, created_at=row.created_at,
        payload=row.payload,
    )


def list_deliveries(session: Session, ctx: StudyContext, subscription_id: uuid.UUID, *, limit: int,
                    cursor: str | None, status: str | None) -> Page[DeliveryOut]:
    """Newest first."""
    _find(session, ctx, subscription_id)
    after = decode_cursor(cursor, 1)
    before_seq = int(after[0]) if after is not None else None
    rows = repository.deliveries(session, subscription_id, limit=limit, before_seq=before_seq, status=status)
    next_cursor = encode_cursor(rows[limit - 1].seq) if len(rows) > limit else None
    return Page(items=[_delivery_out(r) for r in rows[:limit]], next_cursor=next_cursor)


def redeliver(session: Session, ctx: StudyContext, subscription_id: uuid.UUID, delivery_id: uuid.UUID,
              now: datetime) -> DeliveryOut:
    """Send a delivery again now, with the same `webhook-id`, retrying for another day. A disabled
    subscription is enabled again: asking for a redelivery says the receiver is back."""
    sub = _find(session, ctx, subscription_id, for_update=True)
    row = repository.delivery(session, subscription_id, delivery_id, for_update=True)
    if row is None:
        raise NotFound(f"no delivery {delivery_id} of webhook {subscription_id}")
    if row.status == "delivering":
        raise Conflict("this delivery is being attempted right now")
    row.status = "pending"
    row.next_attempt_at = now
    row.give_up_at = now + RETRY_FOR
    if sub.status == "disabled":
        sub.status, sub.disabled_at, sub.disabled_reason = "active", None, None
    sub.failing_since = None
    session.flush()
    return _delivery_out(row)


@dataclass(frozen=True)
class Notice:
    subscription_id: uuid.UUID
    url: str
    status: str
    since: datetime | None


def notices(session: Session, study_id: uuid.UUID) -> list[Notice]:
    """Subscriptions that are disabled or currently failing, for the dashboard."""
    return [Notice(r.id, r.url, r.status, r.disabled_at or r.failing_since)
            for r in repository.disabled_subscriptions(session, study_id)]


# -- the outbox ----------------------------------------------------------------------------------


def emit(session: Session, study_id: uuid.UUID, event: EventType, data: dict[str, Any], *,
         participant_id: uuid.UUID | None = None) -> None:
    """Record `event` for every subscription of the study to it, in the caller's transaction.

    `data` carries ids only (never answers or contact data); the participant's study pseudonym
    is added when the delivery is prepared. Events of one participant are delivered in order.
    Written with the commit, one row per active subscriber chosen in the same statement.
    """
    now = utcnow()
    repository.emit_with_commit(session, study_id, event, participant_id,
                                _payload(study_id, event, participant_id, data, now), now, now + RETRY_FOR)


def _payload(study_id: uuid.UUID, event: EventType, participant_id: uuid.UUID | None, data: dict[str, Any],
             now: datetime) -> dict[str, Any]:
    body = {**data, "study_id": str(study_id)}
    if participant_id is not None:
        body["participant_id"] = str(participant_id)
    return {"type": event, "timestamp": now.isoformat(), "data": body}


def emit_many(session: Session, study_id: uuid.UUID, event: EventType,
              items: list[tuple[uuid.UUID | None, dict[str, Any]]]) -> None:
    """`emit` for a batch (a bulk import): one query when nobody subscribes, one insert otherwise."""
    if not items:
        return
    subscribers = repository.subscribers(session, study_id, event)
    if not subscribers:
        return
    now = utcnow()
    rows: list[dict[str, Any]] = []
    for participant_id, data in items:
        payload = _payload(study_id, event, participant_id, data, now)
        rows.extend(dict(id=uuid.uuid4(), subscription_id=s, study_id=study_id, event=event,
                         ordering_key=participant_id, payload=payload, status="pending", attempts=0,
                         next_attempt_at=now, give_up_at=now + RETRY_FOR, created_at=now)
                    for s in subscribers)
    repository.add_deliveries(session, rows)


# -- delivery ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    """A claimed delivery, ready to post: the URL, the signing secret and the exact body."""

    delivery_id: uuid.UUID
    subscription_id: uuid.UUID
    msg_id: str
    url: str
    secret: str
    body: str
    attempts: int
    give_up_at: datetime


def _body(session: Session, study_id: uuid.UUID, participant_id: uuid.UUID | None, payload: dict[str, Any],
          sealer: Sealer) -> str:
    """The payload as sent: the study's key and the participant's pseudonym filled in. The same
    bytes on every attempt (the pseudonym is a fixed function of the participant)."""
    data = dict(payload.get("data", {}))
    study = session.get(Study, study_id)
    if study is not None:
        data["study"] = study.key
        if participant_id is not None:
            external_id = repository.external_id_of(session, participant_id)
            if external_id is not None:
                data["pseudonym"] = studies.pseudonymiser(session, study, sealer)(external_id)
    return json.dumps({**payload, "data": data}, separators=(",", ":"), sort_keys=True)


def release_expired(session: Session, now: datetime) -> int:
    return repository.release_expired(session, now)


def claim(session: Session, now: datetime, owner: uuid.UUID, lease: timedelta, sealer: Sealer) -> Attempt | None:
    row = repository.claim_one(session, now, owner, lease)
    if row is None:
        return None
    return Attempt(
        delivery_id=row.delivery_id, subscription_id=row.subscription_id, msg_id=signing.message_id(row.delivery_id),
        url=row.url, secret=str(sealer.open(row.secret)["secret"]),
        body=_body(session, row.study_id, row.participant_id, row.payload, sealer),
        attempts=row.attempts, give_up_at=row.give_up_at,
    )


def backoff(attempts: int, base: timedelta) -> timedelta:
    """base, 2 base, 4 base, ... at most an hour."""
    delay: timedelta = base * (2 ** max(attempts - 1, 0))
    return min(delay, MAX_BACKOFF)


def record(session: Session, attempt: Attempt, owner: uuid.UUID, now: datetime, *, code: int | None,
           error: str | None, retry_base: timedelta) -> str:
    """Record one attempt's outcome; returns succeeded, retry, failed or lost (the lease ran out)."""
    if error is None:
        if not repository.finish(session, attempt.delivery_id, owner, status="succeeded", delivered_at=now,
                                 last_response_code=code, last_error=None):
            return "lost"
        repository.mark_subscription_healthy(session, attempt.subscription_id)
        return "succeeded"
    again = now + backoff(attempt.attempts, retry_base)
    if now >= attempt.give_up_at:
        values: dict[str, Any] = {"status": "failed"}
    else:
        values = {"status": "pending", "next_attempt_at": min(again, attempt.give_up_at)}
    if not repository.finish(session, attempt.delivery_id, owner, last_response_code=code, last_error=error[:500],
                             **values):
        return "lost"
    repository.mark_subscription_failing(session, attempt.subscription_id, now, DISABLE_AFTER)
    return "failed" if values["status"] == "failed" else "retry"
