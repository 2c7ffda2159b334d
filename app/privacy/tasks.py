"""Key rotation as a sequence of units of work: each batch is its own transaction, so a long
rotation holds no lock for long and can be stopped and run again (it resumes by finding what
is still sealed under an old key)."""

from __future__ import annotations

from app.core.crypto import Sealer
from app.core.db import Database, transaction
from app.privacy import service


def rotate(db: Database, sealer: Sealer) -> dict[str, int]:
    counts = {}
    for name, key, blob in service.SEALED:
        done, after = 0, None
        while True:
            with transaction(db) as session:
                changed, after = service.reseal_batch(session, sealer, key, blob, after)
            done += changed
            if after is None:
                break
        counts[name] = done
    return counts
