from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, inspect
from sqlalchemy.engine import URL

from app.registry import Base

ROOT = Path(__file__).resolve().parents[1]


def alembic_config(url: URL) -> Config:
    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(ROOT / "migrations"))
    cfg.attributes["database_url"] = url.render_as_string(hide_password=False)
    cfg.attributes["configure_logger"] = False
    return cfg


def tables(url: URL) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade_and_no_drift(fresh_db: URL) -> None:
    cfg = alembic_config(fresh_db)
    ours = set(Base.metadata.tables)
    assert ours <= tables(fresh_db)
    command.downgrade(cfg, "base")
    assert tables(fresh_db) & ours == set()
    command.upgrade(cfg, "head")
    assert ours <= tables(fresh_db)
    command.check(cfg)  # raises if the models and the migrations disagree


def test_migration_files_are_named_by_date() -> None:
    names = sorted(p.name for p in (ROOT / "migrations" / "versions").glob("*.py"))
    assert names
    for name in names:
        date = name.split("-")[0]
        assert len(date) == len("2026_11_25_1826") and date[:4].isdigit(), name


def test_the_group_rollup_is_backfilled_from_what_was_there(fresh_db: URL) -> None:
    """Upgrading to the by-group rollup counts the schedules already there, by the baseline groups
    already answered; the read then equals the plain aggregate, the no-group row included."""
    from datetime import UTC, datetime

    from sqlalchemy import text
    from sqlalchemy.orm import Session

    from app.retention import service

    cfg = alembic_config(fresh_db)
    command.downgrade(cfg, "9a3e6c4b7d21")
    engine = create_engine(fresh_db)
    try:
        with engine.begin() as conn:
            study = conn.execute(text("INSERT INTO studies (id, key, name, timezone, settings) VALUES "
                                      "(gen_random_uuid(), 'old', 'Old', 'UTC', '{}') RETURNING id")).scalar_one()
            for position, (wave, opens, closes) in enumerate((("baseline", 0, 30), ("month6", 168, 228),
                                                              ("month12", 351, 411))):
                conn.execute(text("INSERT INTO waves (id, study_id, key, label, position, offset_days, "
                                  "window_open_days, window_close_days, reminder_policy) VALUES "
                                  "(gen_random_uuid(), :s, :w, :w, :p, :o, :o, :c, '{}')"),
                             {"s": study, "w": wave, "p": position, "o": opens, "c": closes})
            conn.execute(text("""
                INSERT INTO participants (id, study_id, external_id, status, enrolled_at, timezone, created_at,
                                          withdrawn_at)
                SELECT gen_random_uuid(), :s, 'P' || g, CASE WHEN g % 7 = 0 THEN 'withdrawn' ELSE 'active' END,
                       now() - (g * 15) * interval '1 day', 'UTC', now(),
                       CASE WHEN g % 7 = 0 THEN now() - (g * 15 - 100) * interval '1 day' END
                FROM generate_series(1, 30) g"""), {"s": study})
            conn.execute(text("""
                INSERT INTO schedules (study_id, participant_id, wave, opens_at, due_at, closes_at, status)
                SELECT p.study_id, p.id, w.key, p.enrolled_at + w.window_open_days * interval '1 day',
                       p.enrolled_at + w.offset_days * interval '1 day',
                       p.enrolled_at + (w.window_close_days + 1) * interval '1 day', 'scheduled'
                FROM participants p JOIN waves w ON w.study_id = p.study_id"""))
            # baselines: most complete with a group, some partial, one complete without an answer
            conn.execute(text("""
                INSERT INTO responses (study_id, participant_id, wave, status, answers, derived, derived_signature,
                                       codebook_revision, late, completed_at, received_at, updated_at)
                SELECT s.study_id, s.participant_id, s.wave,
                       CASE WHEN p.external_id IN ('P3', 'P8') THEN 'partial' ELSE 'complete' END,
                       CASE WHEN p.external_id = 'P5' THEN '{}'::jsonb ELSE jsonb_build_object('primary_group',
                           (ARRAY['aa_12step', 'smart', 'wfs', 'none'])[1 + abs(hashtext(p.external_id)) % 4]) END,
                       '{}', 'x', 1, false,
                       CASE WHEN p.external_id NOT IN ('P3', 'P8') THEN s.opens_at + interval '2 days' END, now(), now()
                FROM schedules s JOIN participants p ON p.id = s.participant_id
                WHERE s.wave = 'baseline' AND p.external_id NOT IN ('P1', 'P2')"""))
            conn.execute(text("""
                UPDATE schedules s SET completed_at = r.completed_at, status = 'completed'
                FROM responses r WHERE r.participant_id = s.participant_id AND r.wave = s.wave
                  AND r.status = 'complete'"""))
        command.upgrade(cfg, "head")
        with Session(engine) as session:
            waves = ["baseline", "month6", "month12"]
            assert session.scalar(text("SELECT count(*) FROM retention_group_counts")) > 0
            for at in (datetime.now(UTC), datetime(2030, 1, 1, tzinfo=UTC)):
                fast = service.retention(session, study, waves, at, by="primary_group")
                assert fast == service.retention(session, study, waves, at, by="primary_group", rollup=False)
                assert "unknown" in fast and len(fast) >= 3
    finally:
        engine.dispose()
