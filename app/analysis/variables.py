"""The contract's analysis variables, built from the analysis frame (pure pandas, no database).

The frame has one row per complete response: `participant`, `wave`, the item codes and the
derived variables. Predictors are taken from each participant's baseline row.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from app.analysis.errors import ModelError

BASELINE = "baseline"
GROUP_REFERENCE = "aa_12step"
GROUP_LEVELS = ("smart", "lifering", "wfs")  # dummies, in the contract's order
GROUPS_OUT_OF_MODEL = ("other", "none")

ONLINE_PREDICTORS = (
    "woman", "age", "white", "hispanic", "married", "college", "employed", "alcohol_recent", "drug_recent",
    "aud_severity", "self_efficacy_score", "multiple_groups", "goal_abstinence",
)
GROUP_TERMS = tuple(f"primary_group[{g}]" for g in GROUP_LEVELS)


def _flag(series: pd.Series, test: pd.Series) -> pd.Series:
    """1.0 / 0.0 where the source is known, NaN where it is missing."""
    return test.astype(float).where(series.notna())


def _bool(series: pd.Series) -> pd.Series:
    mapped = series.map({True: 1.0, False: 0.0, "true": 1.0, "false": 0.0})
    return mapped.astype(float)


def baseline_predictors(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per participant with a baseline response: the contract's predictors, plus
    `online` (baseline online_30d) and `primary_group`. Missing sources stay NaN."""
    base = frame.loc[frame["wave"] == BASELINE].drop_duplicates("participant").set_index("participant")
    if base.empty:
        raise ModelError("there are no complete baseline responses to analyse yet")
    out = pd.DataFrame(index=base.index)
    out["woman"] = _flag(base["gender"], base["gender"] == "woman")
    out["age"] = pd.to_numeric(base["age"], errors="coerce").astype(float)
    out["white"] = _flag(base["race"], base["race"] == "white")
    out["hispanic"] = _bool(base["hispanic"])
    out["married"] = _flag(base["marital_status"], base["marital_status"] == "married_partnered")
    out["college"] = _flag(base["education"], base["education"].isin(["bachelors", "graduate"]))
    out["employed"] = _flag(base["employment"], base["employment"].isin(["full_time", "part_time"]))
    out["alcohol_recent"] = _flag(base["alcohol_last_use"], base["alcohol_last_use"] == "within_30d")
    out["drug_recent"] = _flag(base["drug_last_use"], base["drug_last_use"].isin(["within_30d", "30d_to_1y"]))
    out["aud_severity"] = pd.to_numeric(base["aud_severity"], errors="coerce").astype(float)
    out["self_efficacy_score"] = pd.to_numeric(base["self_efficacy_score"], errors="coerce").astype(float)
    out["multiple_groups"] = _bool(base["multiple_groups"])
    out["goal_abstinence"] = _flag(base["recovery_goal"], base["recovery_goal"] == "abstinence_forever")
    out["online"] = _bool(base["online_30d"])
    out["primary_group"] = base["primary_group"]
    return out


def add_group_dummies(data: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """Keep participants in the four studied groups; treatment dummies with reference aa_12step.

    Returns the data and how many were left out, by reason."""
    group = data["primary_group"]
    outside = group.isin(GROUPS_OUT_OF_MODEL)
    excluded = {f"primary_group is {g}": int((group == g).sum()) for g in GROUPS_OUT_OF_MODEL if (group == g).any()}
    kept = data.loc[~outside].copy()
    present = set(kept["primary_group"].dropna())
    if len(present) < 2:
        only = ", ".join(sorted(present)) or "none"
        raise ModelError(f"only one primary group among the included participants ({only}); "
                         "the model needs at least two")
    for level, term in zip(GROUP_LEVELS, GROUP_TERMS, strict=True):
        kept[term] = _flag(kept["primary_group"], kept["primary_group"] == level)
    return kept, excluded


def complete_cases(data: pd.DataFrame, columns: list[str]) -> tuple[pd.DataFrame, int]:
    kept = data.dropna(subset=columns)
    return kept, len(data) - len(kept)


def design(data: pd.DataFrame, terms: list[str]) -> pd.DataFrame:
    """The design matrix: an intercept first, then the terms in the given order."""
    matrix = pd.DataFrame({"intercept": np.ones(len(data))}, index=data.index)
    for term in terms:
        matrix[term] = data[term].astype(float)
    return matrix


def check_design(matrix: pd.DataFrame) -> None:
    for term in matrix.columns[1:]:
        if matrix[term].nunique(dropna=True) < 2:
            value = matrix[term].iloc[0] if len(matrix) else "missing"
            raise ModelError(f"{term} takes a single value ({value}) among the included observations; "
                             "it cannot be estimated")
