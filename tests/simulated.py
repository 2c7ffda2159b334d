"""The analysis frame of a simulated cohort, built in memory (the database path is tested elsewhere)."""

from __future__ import annotations

from typing import Any

import pandas as pd

from app.analysis.simulate import Cohort
from app.instruments.codebook import parse_codebook
from app.responses.validation import carried_from, compute_derived
from tests.factories import pal_codebook

CODEBOOK = parse_codebook(pal_codebook())
ORDER = {w: i for i, w in enumerate(CODEBOOK.wave_keys)}


def frame_of(cohort: Cohort) -> pd.DataFrame:
    rows: list[dict[str, Any]] = []
    baseline: dict[str, dict[str, Any]] = {}
    for r in sorted(cohort.responses, key=lambda r: (r.external_id, ORDER[r.wave])):
        carried = {code: baseline.get(r.external_id, {}).get(code) for code in carried_from(CODEBOOK, r.wave)}
        derived = compute_derived(CODEBOOK, r.wave, r.answers, carried)
        if r.wave == "baseline":
            baseline[r.external_id] = derived
        rows.append({"participant": r.external_id, "wave": r.wave, **r.answers, **derived})
    return pd.DataFrame(rows)
