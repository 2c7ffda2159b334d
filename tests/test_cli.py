"""The `cohort` command as a user types it: clear one-line failures, imports from a file, progress
on a terminal and none in a pipe."""

from __future__ import annotations

import os
import re
import select
import subprocess
import sys
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL

from tests.conftest import SECRET_KEY

COHORT = str(Path(sys.executable).parent / "cohort")
# what a progress bar leaves in a file: bar and spinner glyphs, carriage returns, cursor controls
BAR_NOISE = re.compile("[\u2500-\u28ff\u2713]|\r|\x1b\\[")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def environment(database_url: str, cwd: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COHORT_", "DATABASE_URL", "REDIS_URL"))}
    env.update({"DATABASE_URL": database_url, "COHORT_SECRET_KEY": SECRET_KEY, "COHORT_DATA_DIR": str(cwd)})
    return env | extra


def run(*args: str, database_url: str, cwd: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([COHORT, *args], env=environment(database_url, cwd, **extra), capture_output=True, text=True,
                          timeout=120, check=False, cwd=cwd)


def run_on_a_terminal(*args: str, database_url: str, cwd: Path) -> str:
    """The command with stdout and stderr on a pseudo-terminal 120 columns wide: what a person sees."""
    import pty

    master, child_end = pty.openpty()
    env = environment(database_url, cwd, TERM="xterm", COLUMNS="120", LINES="40")
    proc = subprocess.Popen([COHORT, *args], env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=child_end,
                            stderr=child_end)
    os.close(child_end)
    seen = b""
    try:
        while select.select([master], [], [], 120)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the command has ended and closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        assert proc.wait(timeout=30) == 0, seen.decode(errors="replace")[-2000:]
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    return ANSI.sub("", seen.decode(errors="replace")).replace("\r", "\n")


def test_an_unreachable_database_is_one_line_naming_it(tmp_path: Path) -> None:
    done = run("migrate", database_url="postgresql://nobody@127.0.0.1:1/nowhere", cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: DATABASE_URL (127.0.0.1:1/nowhere) cannot be reached")
    assert "Traceback" not in done.stderr


def test_serve_on_a_busy_port_says_so_before_any_setup(tmp_path: Path) -> None:
    import socket

    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        done = run("serve", "--port", str(port), database_url="postgresql://nobody@127.0.0.1:1/nowhere", cwd=tmp_path)
    assert done.returncode == 3
    assert done.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}") and "--port" in done.stderr
    assert "DATABASE_URL" not in done.stderr  # it stopped before reaching for the database


def test_import_a_file_all_or_nothing_then_partial(fresh_db: URL, tmp_path: Path) -> None:
    url = fresh_db.render_as_string(hide_password=False)
    assert run("simulate", "--study", "pal", "--participants", "12", database_url=url, cwd=tmp_path).returncode == 0
    file = tmp_path / "people.csv"
    file.write_text("external_id,enrolled_at,email\nNEW1,2026-11-01T10:00:00Z,new1@example.org\nNEW2,not-a-date,\n")
    refused = run("import", "pal", str(file), database_url=url, cwd=tmp_path)
    assert refused.returncode == 1
    assert not BAR_NOISE.search(refused.stdout + refused.stderr)  # not a terminal: no spinner, no bar
    assert "row 2: enrolled_at" in refused.stderr and "0 enrolled" in refused.stdout
    partial = run("import", "pal", str(file), "--partial", database_url=url, cwd=tmp_path)
    assert partial.returncode == 0 and "1 enrolled" in partial.stdout
    engine = create_engine(fresh_db)
    with engine.connect() as conn:
        stored = conn.execute(text("SELECT external_id FROM participants WHERE external_id LIKE 'NEW%'")).scalars()
        assert list(stored) == ["NEW1"]
    engine.dispose()


def test_simulate_and_rotate_keys_print_only_results_when_not_on_a_terminal(fresh_db: URL, tmp_path: Path) -> None:
    url = fresh_db.render_as_string(hide_password=False)
    simulated = run("simulate", "--study", "pal", "--participants", "30", database_url=url, cwd=tmp_path)
    assert simulated.returncode == 0, simulated.stderr
    assert simulated.stderr == ""
    assert simulated.stdout.splitlines()[0].startswith("study pal: 30 participants, ")
    assert not BAR_NOISE.search(simulated.stdout)
    # the key changes: every contact and the study's pseudonym key are sealed again under the new one
    rotated = run("rotate-keys", database_url=url, cwd=tmp_path,
                  COHORT_SECRET_KEY="a-new-secret-key-fedcba9876543210", COHORT_OLD_SECRET_KEYS=SECRET_KEY)
    assert rotated.returncode == 0, rotated.stderr
    assert rotated.stderr == ""
    lines = rotated.stdout.splitlines()
    assert "participant contacts: 30 re-sealed" in lines and "study pseudonym keys: 1 re-sealed" in lines
    assert not BAR_NOISE.search(rotated.stdout)


def test_on_a_terminal_simulate_and_import_show_counts_and_rates(fresh_db: URL, tmp_path: Path) -> None:
    url = fresh_db.render_as_string(hide_password=False)
    shown = run_on_a_terminal("simulate", "--study", "pal", "--participants", "600", database_url=url, cwd=tmp_path)
    lines = shown.splitlines()
    written = [line for line in lines if line.startswith("✓ enrolling and answering")]
    assert written, shown[-2000:]
    assert "600/600 participants" in written[-1] and re.search(r"[\d,.]+ participants/s", written[-1])
    assert any("250/600 participants" in line for line in lines), "the count moves while it works"
    assert "study pal: 600 participants" in shown  # the result, below the bar
    file = tmp_path / "people.csv"
    file.write_text("external_id,enrolled_at\n" + "".join(f"T{i},2026-11-01T10:00:00Z\n" for i in range(40)))
    shown = run_on_a_terminal("import", "pal", str(file), database_url=url, cwd=tmp_path)
    final = [line for line in shown.splitlines() if line.startswith("✓ ")][-3:]
    assert final[0].startswith("✓ reading people.csv")
    assert final[1].startswith("✓ checking") and "40/40 rows" in final[1] and "rows/s" in final[1]
    assert final[2].startswith("✓ enrolling") and "40/40 rows" in final[2]
    assert "40 enrolled in" in shown
