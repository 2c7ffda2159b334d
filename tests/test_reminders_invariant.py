"""What the claim relies on instead of reading participants and schedules: a pending send's
participant has not withdrawn, its window is not complete, and its copies of the window's close
and the participant's zone are current. The database keeps it, whoever writes."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, text
from sqlalchemy.engine import URL

from app.core.db import make_engine, make_sessionmaker
from app.reminders import service


def _participant(connection: Connection) -> tuple[Any, Any]:
    study = connection.execute(text("INSERT INTO studies (key, name, timezone, settings) "
                                    "VALUES ('inv', 'Inv', 'UTC', '{}') RETURNING id")).scalar_one()
    person = connection.execute(text(
        "INSERT INTO participants (study_id, external_id, status, enrolled_at, timezone) "
        "VALUES (:s, 'I1', 'active', now(), 'Europe/Paris') RETURNING id"), {"s": study}).scalar_one()
    for wave, days in (("baseline", 14), ("month6", 200)):
        connection.execute(text(
            "INSERT INTO schedules (study_id, participant_id, wave, opens_at, due_at, closes_at, status) "
            "VALUES (:s, :p, :w, now(), now(), now() + make_interval(days => :d), 'scheduled')"),
            {"s": study, "p": person, "w": wave, "d": days})
    return study, person


def _send(connection: Connection, study: Any, person: Any, wave: str, kind: str, status: str = "pending") -> Any:
    return connection.execute(text(
        "INSERT INTO reminder_sends (id, study_id, participant_id, wave, kind, due_at, status, attempts) "
        "VALUES (:id, :s, :p, :w, :k, now(), :st, 0) RETURNING id"),
        {"id": uuid.uuid4(), "s": study, "p": person, "w": wave, "k": kind, "st": status}).scalar_one()


def _rows(connection: Connection, person: Any) -> dict[tuple[str, str], Any]:
    return {(r.wave, r.kind): r for r in connection.execute(text(
        "SELECT r.wave, r.kind, r.status, r.last_error, r.timezone, r.closes_at = s.closes_at AS same_close "
        "FROM reminder_sends r JOIN schedules s ON s.participant_id = r.participant_id AND s.wave = r.wave "
        "WHERE r.participant_id = :p"), {"p": person})}


def test_a_send_takes_its_window_and_zone_and_follows_them(connection: Connection) -> None:
    study, person = _participant(connection)
    _send(connection, study, person, "baseline", "invitation")
    row = _rows(connection, person)[("baseline", "invitation")]
    assert (row.status, row.timezone, row.same_close) == ("pending", "Europe/Paris", True)
    connection.execute(text("UPDATE participants SET timezone = 'Asia/Tokyo' WHERE id = :p"), {"p": person})
    connection.execute(text("UPDATE schedules SET closes_at = closes_at + interval '3 days' "
                            "WHERE participant_id = :p AND wave = 'baseline'"), {"p": person})
    row = _rows(connection, person)[("baseline", "invitation")]
    assert (row.timezone, row.same_close) == ("Asia/Tokyo", True)


def test_completion_and_withdrawal_cancel_pending_sends_whoever_writes_them(connection: Connection) -> None:
    study, person = _participant(connection)
    for wave, kind in (("baseline", "invitation"), ("baseline", "reminder_1"), ("month6", "invitation")):
        _send(connection, study, person, wave, kind)
    sending = _send(connection, study, person, "month6", "reminder_1")
    connection.execute(text("UPDATE reminder_sends SET status = 'sending' WHERE id = :id"), {"id": sending})
    connection.execute(text("UPDATE schedules SET completed_at = now() WHERE participant_id = :p "
                            "AND wave = 'baseline'"), {"p": person})
    rows = _rows(connection, person)
    assert {k: (r.status, r.last_error) for k, r in rows.items() if k[0] == "baseline"} == {
        ("baseline", "invitation"): ("cancelled", "wave completed"),
        ("baseline", "reminder_1"): ("cancelled", "wave completed")}
    assert rows[("month6", "invitation")].status == "pending"
    # a send made for a completed window never becomes pending
    _send(connection, study, person, "baseline", "manual_1")
    assert _rows(connection, person)[("baseline", "manual_1")].status == "cancelled"

    connection.execute(text("UPDATE participants SET status = 'withdrawn', withdrawn_at = now() WHERE id = :p"),
                       {"p": person})
    rows = _rows(connection, person)
    assert (rows[("month6", "invitation")].status, rows[("month6", "invitation")].last_error) == (
        "cancelled", "participant withdrew")
    assert rows[("month6", "reminder_1")].status == "sending"  # in a worker's hands: left to it
    # its lease runs out (or the worker records a retry): it does not go back to pending
    connection.execute(text("UPDATE reminder_sends SET status = 'pending', lease_expires_at = NULL WHERE id = :id"),
                       {"id": sending})
    row = _rows(connection, person)[("month6", "reminder_1")]
    assert (row.status, row.last_error) == ("cancelled", "participant withdrew")
    _send(connection, study, person, "month6", "manual_2")
    assert _rows(connection, person)[("month6", "manual_2")].status == "cancelled"


def _committed_window(engine: Engine, external_id: str) -> Any:
    with engine.begin() as c:
        study = c.execute(text("SELECT id FROM studies WHERE key = 'race'")).scalar()
        if study is None:
            study = c.execute(text("INSERT INTO studies (key, name, timezone, settings) "
                                   "VALUES ('race', 'Race', 'UTC', '{}') RETURNING id")).scalar_one()
            c.execute(text("INSERT INTO waves (study_id, key, label, position, offset_days, window_open_days, "
                           "window_close_days, reminder_policy) VALUES (:s, 'baseline', 'Baseline', 0, 0, 0, 13, "
                           "'{}')"), {"s": study})
        person = c.execute(text(
            "INSERT INTO participants (study_id, external_id, status, enrolled_at, timezone) "
            "VALUES (:s, :e, 'active', now() - interval '1 hour', 'UTC') RETURNING id"),
            {"s": study, "e": external_id}).scalar_one()
        c.execute(text("INSERT INTO schedules (study_id, participant_id, wave, opens_at, due_at, closes_at, status) "
                       "VALUES (:s, :p, 'baseline', now() - interval '1 hour', now(), now() + interval '13 days', "
                       "'scheduled')"), {"s": study, "p": person})
    return person


def _withdraw(engine: Engine, person: Any) -> threading.Thread:
    def run() -> None:
        with engine.begin() as c:
            c.execute(text("SET LOCAL lock_timeout = '20s'"))
            c.execute(text("UPDATE participants SET status = 'withdrawn', withdrawn_at = now() WHERE id = :p"),
                      {"p": person})
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_withdrawal_racing_the_planner_leaves_nothing_pending(fresh_db: URL) -> None:
    """The planner and a withdrawal of the same participant, in either order, in transactions
    that overlap: no send of a withdrawn participant is left pending (the claim would send it)."""
    engine = make_engine(fresh_db)
    sessions = make_sessionmaker(engine)
    now = datetime.now(UTC)
    try:
        first = _committed_window(engine, "R1")
        with sessions() as planner:  # planning first: the withdrawal waits for it, then cancels its sends
            assert service.plan(planner, now) == 1
            withdrawal = _withdraw(engine, first)
            withdrawal.join(1.0)
            assert withdrawal.is_alive()  # held by the planner's lock on the participant
            planner.commit()
        withdrawal.join(20)
        assert not withdrawal.is_alive()

        second = _committed_window(engine, "R2")
        with engine.connect() as writer:  # the withdrawal first: the planner passes the participant by
            writer.execute(text("UPDATE participants SET status = 'withdrawn', withdrawn_at = now() WHERE id = :p"),
                           {"p": second})
            with sessions() as planner:
                assert service.plan(planner, now) == 0
                planner.commit()
            writer.commit()
        with sessions() as planner:
            assert service.plan(planner, now) == 1  # planned now, as withdrawn: no sends
            planner.commit()

        with engine.connect() as c:
            rows = c.execute(text("SELECT p.external_id, r.status, r.last_error FROM reminder_sends r "
                                  "JOIN participants p ON p.id = r.participant_id")).all()
        assert [r.external_id for r in rows] == ["R1"]
        assert [(r.status, r.last_error) for r in rows] == [("cancelled", "participant withdrew")]
    finally:
        engine.dispose()
