"""The `cohort` command as a user types it: clear one-line failures, imports from a file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL

from tests.conftest import SECRET_KEY

COHORT = str(Path(sys.executable).parent / "cohort")


def run(*args: str, database_url: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COHORT_", "DATABASE_URL", "REDIS_URL"))}
    env.update({"DATABASE_URL": database_url, "COHORT_SECRET_KEY": SECRET_KEY, "COHORT_DATA_DIR": str(cwd)})
    return subprocess.run([COHORT, *args], env=env, capture_output=True, text=True, timeout=120, check=False, cwd=cwd)


def test_an_unreachable_database_is_one_line_naming_it(tmp_path: Path) -> None:
    done = run("migrate", database_url="postgresql://nobody@127.0.0.1:1/nowhere", cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: DATABASE_URL (127.0.0.1:1/nowhere) cannot be reached")
    assert "Traceback" not in done.stderr


def test_import_a_file_all_or_nothing_then_partial(fresh_db: URL, tmp_path: Path) -> None:
    url = fresh_db.render_as_string(hide_password=False)
    assert run("simulate", "--study", "pal", "--participants", "12", database_url=url, cwd=tmp_path).returncode == 0
    file = tmp_path / "people.csv"
    file.write_text("external_id,enrolled_at,email\nNEW1,2026-11-01T10:00:00Z,new1@example.org\nNEW2,not-a-date,\n")
    refused = run("import", "pal", str(file), database_url=url, cwd=tmp_path)
    assert refused.returncode == 1
    assert "row 2: enrolled_at" in refused.stderr and "0 enrolled" in refused.stdout
    partial = run("import", "pal", str(file), "--partial", database_url=url, cwd=tmp_path)
    assert partial.returncode == 0 and "1 enrolled" in partial.stdout
    engine = create_engine(fresh_db)
    with engine.connect() as conn:
        stored = conn.execute(text("SELECT external_id FROM participants WHERE external_id LIKE 'NEW%'")).scalars()
        assert list(stored) == ["NEW1"]
    engine.dispose()
