"""Key rotation as a sequence of units of work: each batch is its own transaction, so a long
rotation holds no lock for long and can be stopped and run again (it resumes by finding what
is still sealed under an old key)."""

from __future__ import annotations

from app.core.crypto import Sealer
from app.core.db import Database, transaction
from app.core.progress import SILENT, Progress
from app.privacy import service


def rotate(db: Database, sealer: Sealer, progress: Progress = SILENT) -> dict[str, int]:
    counts = {}
    for name, key, blob in service.SEALED:
        with transaction(db) as session:
            total = service.sealed_count(session, key, blob)
        progress.step(f"re-sealing {name}", total=total, unit="values")
        done, after = 0, None
        while True:
            with transaction(db) as session:
                changed, checked, after = service.reseal_batch(session, sealer, key, blob, after)
            done += changed
            progress.advance(checked)
            if after is None:
                break
        counts[name] = done
    return counts
