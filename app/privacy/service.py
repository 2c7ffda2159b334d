"""Key rotation: re-seal everything sealed with an old COHORT_SECRET_KEY under the current one.

Run `cohort rotate-keys` with the new key in COHORT_SECRET_KEY and the previous one in
COHORT_OLD_SECRET_KEYS; once it reports nothing left to re-seal, the old key can be dropped.
Pseudonyms do not change (each study's pseudonym key is re-sealed, not replaced).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import InstrumentedAttribute

from app.core.crypto import Sealer
from app.core.db import Database, transaction
from app.idempotency.models import IdempotencyRecord
from app.participants.models import Contact
from app.studies.models import Study

BATCH = 1000

SEALED: tuple[tuple[str, Any, Any], ...] = (
    ("participant contacts", Contact.participant_id, Contact.sealed),
    ("study pseudonym keys", Study.id, Study.pseudonym_key),
    ("idempotent replies", IdempotencyRecord.id, IdempotencyRecord.sealed_body),
)


def rotate(db: Database, sealer: Sealer) -> dict[str, int]:
    counts = {}
    for name, key, blob in SEALED:
        counts[name] = _reseal(db, sealer, key, blob)
    return counts


def _reseal(db: Database, sealer: Sealer, key: InstrumentedAttribute[Any], blob: InstrumentedAttribute[Any]) -> int:
    table = key.class_
    done, after = 0, None
    while True:
        with transaction(db) as session:
            query = select(key, blob).where(blob.is_not(None)).order_by(key).limit(BATCH).with_for_update()
            if after is not None:
                query = query.where(key > after)
            rows = session.execute(query).all()
            if not rows:
                return done
            after = rows[-1][0]
            for row_key, sealed in rows:
                if sealer.needs_rotation(sealed):
                    session.execute(update(table).where(key == row_key)
                                    .values({blob.key: sealer.seal(sealer.open(sealed))}))
                    done += 1

