"""Key rotation: re-seal everything sealed with an old COHORT_SECRET_KEY under the current one.

Run `cohort rotate-keys` with the new key in COHORT_SECRET_KEY and the previous one in
COHORT_OLD_SECRET_KEYS; once it reports nothing left to re-seal, the old key can be dropped.
Pseudonyms do not change (each study's pseudonym key is re-sealed, not replaced).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import InstrumentedAttribute, Session

from app.core.crypto import Sealer
from app.idempotency.models import IdempotencyRecord
from app.participants.models import Contact
from app.privacy import repository
from app.studies.models import Study

BATCH = 1000

SEALED: tuple[tuple[str, Any, Any], ...] = (
    ("participant contacts", Contact.participant_id, Contact.sealed),
    ("study pseudonym keys", Study.id, Study.pseudonym_key),
    ("study date-shift keys", Study.id, Study.date_shift_key),
    ("idempotent replies", IdempotencyRecord.id, IdempotencyRecord.sealed_body),
)


def sealed_count(session: Session, key: InstrumentedAttribute[Any], blob: InstrumentedAttribute[Any]) -> int:
    """How many values of one kind are sealed (what a rotation will look at)."""
    return repository.sealed_count(session, key, blob)


def reseal_batch(session: Session, sealer: Sealer, key: InstrumentedAttribute[Any],
                 blob: InstrumentedAttribute[Any], after: Any) -> tuple[int, int, Any]:
    """One batch (one unit of work): values sealed under an old key, sealed again under the
    current one. Returns how many changed, how many were looked at, and where the next batch
    starts (None: done)."""
    rows = repository.sealed_batch(session, key, blob, after, BATCH)
    done = 0
    for row_key, sealed in rows:
        if sealer.needs_rotation(sealed):
            repository.reseal(session, key, blob, row_key, sealer.seal(sealer.open(sealed)))
            done += 1
    return done, len(rows), (rows[-1][0] if rows else None)
