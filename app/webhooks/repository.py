"""All SQL of webhooks: subscriptions, and the delivery outbox claimed with SKIP LOCKED."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Table, bindparam, delete, func, insert, literal, or_, select, text, update
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import Session

from app.core.db import with_commit
from app.webhooks.models import WebhookDelivery, WebhookSubscription


def add_subscription(session: Session, row: WebhookSubscription) -> None:
    session.add(row)
    session.flush()


def subscriptions(session: Session, study_id: uuid.UUID) -> list[WebhookSubscription]:
    return list(session.scalars(select(WebhookSubscription).where(WebhookSubscription.study_id == study_id)
                                .order_by(WebhookSubscription.created_at, WebhookSubscription.id)))


def subscription(session: Session, study_id: uuid.UUID, subscription_id: uuid.UUID, *,
                 for_update: bool = False) -> WebhookSubscription | None:
    query = select(WebhookSubscription).where(WebhookSubscription.id == subscription_id,
                                              WebhookSubscription.study_id == study_id)
    if for_update:
        query = query.with_for_update()
    return session.scalars(query).one_or_none()


def delete_subscription(session: Session, subscription_id: uuid.UUID) -> None:
    session.execute(delete(WebhookSubscription).where(WebhookSubscription.id == subscription_id))


def subscribers(session: Session, study_id: uuid.UUID, event: str) -> list[uuid.UUID]:
    """Active subscriptions of a study to `event`: a disabled one receives nothing new."""
    return list(session.scalars(select(WebhookSubscription.id).where(
        WebhookSubscription.study_id == study_id, WebhookSubscription.status == "active",
        WebhookSubscription.events.contains([event]))))


_subs = WebhookSubscription.__table__
_deliveries = WebhookDelivery.__table__
assert isinstance(_subs, Table) and isinstance(_deliveries, Table)
# One event for every active subscriber, chosen by the database: no round trip to ask who subscribes.
# public: app.responses.repository folds it with the response's writes
EMIT = insert(_deliveries).from_select(
    ["id", "subscription_id", "study_id", "event", "ordering_key", "payload", "status", "attempts",
     "next_attempt_at", "give_up_at", "created_at"],
    select(func.gen_random_uuid(), _subs.c.id, _subs.c.study_id, bindparam("event"), bindparam("ordering"),
           bindparam("payload", type_=JSONB), literal("pending"), literal(0), bindparam("now"),
           bindparam("give_up_at"), bindparam("now"))
    .where(_subs.c.study_id == bindparam("study"), _subs.c.status == "active",
           _subs.c.events.contains(bindparam("events", type_=ARRAY(_subs.c.events.type.item_type)))))


def emit_with_commit(session: Session, study_id: uuid.UUID, event: str, ordering_key: uuid.UUID | None,
                     payload: dict[str, Any], now: datetime, give_up_at: datetime) -> None:
    """A delivery of `payload` for each active subscription of the study to `event`, written with the commit."""
    with_commit(session, EMIT, {"study": study_id, "event": event, "events": [event], "ordering": ordering_key,
                                 "payload": payload, "now": now, "give_up_at": give_up_at})


def add_deliveries(session: Session, rows: list[dict[str, Any]]) -> None:
    if rows:
        session.execute(insert(WebhookDelivery), rows)


def deliveries(session: Session, subscription_id: uuid.UUID, *, limit: int, before_seq: int | None,
               status: str | None) -> list[WebhookDelivery]:
    query = select(WebhookDelivery).where(WebhookDelivery.subscription_id == subscription_id)
    if before_seq is not None:
        query = query.where(WebhookDelivery.seq < before_seq)
    if status is not None:
        query = query.where(WebhookDelivery.status == status)
    return list(session.scalars(query.order_by(WebhookDelivery.seq.desc()).limit(limit + 1)))


def delivery(session: Session, subscription_id: uuid.UUID, delivery_id: uuid.UUID, *,
             for_update: bool = False) -> WebhookDelivery | None:
    query = select(WebhookDelivery).where(WebhookDelivery.id == delivery_id,
                                          WebhookDelivery.subscription_id == subscription_id)
    if for_update:
        query = query.with_for_update()
    return session.scalars(query).one_or_none()


def release_expired(session: Session, now: datetime) -> int:
    """Deliveries whose worker died mid-attempt are pending again (same id, so receivers deduplicate)."""
    result = session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.status == "delivering", WebhookDelivery.lease_expires_at < now)
        .values(status="pending", claimed_by=None, lease_expires_at=None, next_attempt_at=now,
                last_error="the worker stopped during the attempt")
    )
    return int(getattr(result, "rowcount", 0) or 0)


_CLAIM = text("""
    WITH next AS (
        SELECT d.id FROM webhook_deliveries d
        JOIN webhook_subscriptions s ON s.id = d.subscription_id
        WHERE d.status = 'pending' AND d.next_attempt_at <= :now AND s.status = 'active'
          AND NOT EXISTS (
              SELECT 1 FROM webhook_deliveries e
              WHERE e.subscription_id = d.subscription_id AND e.ordering_key = d.ordering_key
                AND e.seq < d.seq AND e.status IN ('pending', 'delivering'))
        ORDER BY d.next_attempt_at, d.seq
        LIMIT 1
        FOR UPDATE OF d SKIP LOCKED)
    UPDATE webhook_deliveries d
    SET status = 'delivering', attempts = d.attempts + 1, claimed_by = :owner, lease_expires_at = :lease,
        last_attempt_at = :now
    FROM next WHERE d.id = next.id
    RETURNING d.id, d.subscription_id, d.study_id, d.ordering_key, d.payload, d.attempts, d.give_up_at
""")


@dataclass(frozen=True)
class ClaimedRow:
    delivery_id: uuid.UUID
    subscription_id: uuid.UUID
    study_id: uuid.UUID
    participant_id: uuid.UUID | None
    payload: dict[str, Any]
    attempts: int
    give_up_at: datetime
    url: str
    secret: bytes


def claim_one(session: Session, now: datetime, owner: uuid.UUID, lease: timedelta) -> ClaimedRow | None:
    """The next due delivery whose participant has no earlier one still open, leased to `owner`."""
    row = session.execute(_CLAIM, {"now": now, "owner": owner, "lease": now + lease}).one_or_none()
    if row is None:
        return None
    sub = session.execute(select(WebhookSubscription.url, WebhookSubscription.secret)
                          .where(WebhookSubscription.id == row.subscription_id)).one()
    return ClaimedRow(row.id, row.subscription_id, row.study_id, row.ordering_key, row.payload, row.attempts,
                      row.give_up_at, sub.url, sub.secret)


def finish(session: Session, delivery_id: uuid.UUID, owner: uuid.UUID, **values: Any) -> bool:
    result = session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id, WebhookDelivery.status == "delivering",
               WebhookDelivery.claimed_by == owner)
        .values(claimed_by=None, lease_expires_at=None, **values)
    )
    return bool(getattr(result, "rowcount", 0))


def mark_subscription_healthy(session: Session, subscription_id: uuid.UUID) -> None:
    session.execute(update(WebhookSubscription)
                    .where(WebhookSubscription.id == subscription_id, WebhookSubscription.failing_since.is_not(None))
                    .values(failing_since=None))


def mark_subscription_failing(session: Session, subscription_id: uuid.UUID, now: datetime,
                              disable_after: timedelta) -> bool:
    """Start (or continue) the failure clock; disable the subscription once it has run a full day.
    Returns whether it was disabled just now."""
    session.execute(update(WebhookSubscription)
                    .where(WebhookSubscription.id == subscription_id, WebhookSubscription.failing_since.is_(None))
                    .values(failing_since=now))
    result = session.execute(
        update(WebhookSubscription)
        .where(WebhookSubscription.id == subscription_id, WebhookSubscription.status == "active",
               WebhookSubscription.failing_since <= now - disable_after)
        .values(status="disabled", disabled_at=now,
                disabled_reason=f"every delivery failed for {disable_after.total_seconds() / 3600:g} hours")
    )
    return bool(getattr(result, "rowcount", 0))


def disabled_subscriptions(session: Session, study_id: uuid.UUID) -> list[WebhookSubscription]:
    return list(session.scalars(select(WebhookSubscription).where(
        WebhookSubscription.study_id == study_id,
        or_(WebhookSubscription.status == "disabled", WebhookSubscription.failing_since.is_not(None)))))


def external_id_of(session: Session, participant_id: uuid.UUID) -> str | None:
    value = session.execute(text("SELECT external_id FROM participants WHERE id = :id"),
                            {"id": participant_id}).scalar_one_or_none()
    return None if value is None else str(value)
