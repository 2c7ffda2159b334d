"""The PAL models as pure functions from the analysis frame to a JSON-ready result.

- `table1`: baseline descriptives by online_30d, chi-square (categorical) or Welch t (continuous).
- `online_attendance`: statsmodels Logit of baseline online_30d.
- `abstinence`: statsmodels GEE (Binomial, logit, exchangeable, clusters = participant) of
  abstinent_30d over all observed waves with an online x wave interaction; `model2` adds
  primary_group and multiple_groups.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pandas as pd
import statsmodels.api as sm
from scipy import stats as scipy_stats
from statsmodels.genmod.cov_struct import Exchangeable
from statsmodels.genmod.generalized_estimating_equations import GEE
from statsmodels.tools.sm_exceptions import ConvergenceWarning, PerfectSeparationWarning

from app.analysis.errors import ModelError
from app.analysis.variables import (
    BASELINE,
    GROUP_TERMS,
    ONLINE_PREDICTORS,
    add_group_dummies,
    baseline_predictors,
    check_design,
    complete_cases,
    design,
)

Z95 = float(scipy_stats.norm.ppf(0.975))


def _number(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def coefficients(params: pd.Series, bse: pd.Series, pvalues: pd.Series) -> list[dict[str, Any]]:
    """Estimates with the odds ratio and its 95 % Wald interval, exp(b -/+ z * se)."""
    out = []
    for term in params.index:
        b, se = float(params[term]), float(bse[term])
        out.append({
            "term": term, "estimate": _number(b), "std_error": _number(se), "odds_ratio": _number(math.exp(b)),
            "ci_low": _number(math.exp(b - Z95 * se)), "ci_high": _number(math.exp(b + Z95 * se)),
            "p_value": _number(pvalues[term]),
        })
    return out


def _excluded(reasons: dict[str, int]) -> list[dict[str, Any]]:
    return [{"reason": reason, "n": n} for reason, n in reasons.items() if n]


# -- Table 1 -----------------------------------------------------------------------------------

TABLE1_CATEGORICAL = ("gender", "race", "hispanic", "marital_status", "education", "employment", "income",
                      "urbanicity", "alcohol_last_use", "drug_last_use", "recovery_goal", "online_ever",
                      "primary_group", "multiple_groups", "weekly_attendance", "home_group", "has_sponsor")
TABLE1_CONTINUOUS = ("age", "aud_severity", "self_efficacy_score", "meetings_30d", "involvement_score",
                     "cohesion_score", "satisfaction")


def table1(frame: pd.DataFrame) -> dict[str, Any]:
    base = frame.loc[frame["wave"] == BASELINE].drop_duplicates("participant")
    if base.empty:
        raise ModelError("there are no complete baseline responses to describe yet")
    online = base["online_30d"].map({True: True, False: False, "true": True, "false": False})
    base = base.loc[online.notna()]
    online = online.loc[online.notna()].astype(bool)
    groups = {"online": base.loc[online], "not_online": base.loc[~online]}
    if min(len(g) for g in groups.values()) == 0:
        raise ModelError("everyone (or no one) attended online in the last 30 days; there is nothing to compare")
    variables: list[dict[str, Any]] = []
    for name in TABLE1_CATEGORICAL:
        if name in base.columns:
            variables.append(_categorical(name, groups))
    for name in TABLE1_CONTINUOUS:
        if name in base.columns:
            variables.append(_continuous(name, groups))
    return {"n": {k: len(v) for k, v in groups.items()}, "variables": variables}


def _categorical(name: str, groups: dict[str, pd.DataFrame]) -> dict[str, Any]:
    values = {k: g[name].dropna().astype(str) for k, g in groups.items()}
    levels = sorted(set().union(*(set(v) for v in values.values())))
    table = np.array([[int((values[k] == level).sum()) for k in groups] for level in levels])
    row: dict[str, Any] = {"variable": name, "type": "categorical", "levels": [
        {"level": level, **{k: {"n": int(table[i, j]), "pct": _pct(table[i, j], table[:, j].sum())}
                            for j, k in enumerate(groups)}}
        for i, level in enumerate(levels)
    ], "test": "chi-square"}
    if len(levels) >= 2 and table.sum(axis=0).min() > 0:
        chi2, p, dof, _ = scipy_stats.chi2_contingency(table, correction=False)
        row.update(statistic=_number(chi2), df=int(dof), p_value=_number(p))
    else:
        row.update(statistic=None, df=None, p_value=None)
    return row


def _pct(n: int, total: int) -> float | None:
    return 100.0 * n / total if total else None


def _continuous(name: str, groups: dict[str, pd.DataFrame]) -> dict[str, Any]:
    values = {k: pd.to_numeric(g[name], errors="coerce").dropna().astype(float) for k, g in groups.items()}
    row: dict[str, Any] = {"variable": name, "type": "continuous", "test": "welch-t"}
    for k, v in values.items():
        row[k] = {"n": len(v), "mean": _number(v.mean()) if len(v) else None,
                  "sd": _number(v.std(ddof=1)) if len(v) > 1 else None}
    a, b = values["online"], values["not_online"]
    if len(a) > 1 and len(b) > 1 and (a.var() > 0 or b.var() > 0):
        test = scipy_stats.ttest_ind(a, b, equal_var=False)
        row.update(statistic=_number(test.statistic), df=_number(test.df), p_value=_number(test.pvalue))
    else:
        row.update(statistic=None, df=None, p_value=None)
    return row


# -- online attendance (Logit) -----------------------------------------------------------------


def online_attendance_data(frame: pd.DataFrame) -> tuple[pd.Series, pd.DataFrame, dict[str, int]]:
    data = baseline_predictors(frame)
    data, excluded = add_group_dummies(data)
    columns = ["online", *ONLINE_PREDICTORS, *GROUP_TERMS]
    data, dropped = complete_cases(data, columns)
    excluded["missing a model variable"] = dropped
    data = data.sort_index()
    return data["online"], design(data, [*ONLINE_PREDICTORS, *GROUP_TERMS]), excluded


def online_attendance(frame: pd.DataFrame) -> dict[str, Any]:
    y, x, excluded = online_attendance_data(frame)
    if len(y) <= x.shape[1]:
        raise ModelError(f"too few complete baseline responses ({len(y)}) for {x.shape[1]} coefficients")
    if y.nunique() < 2:
        raise ModelError("online_30d is the same for every participant; the model cannot be estimated")
    check_design(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PerfectSeparationWarning)
        warnings.simplefilter("ignore", ConvergenceWarning)
        try:
            result = sm.Logit(y, x).fit(disp=0, method="newton", maxiter=100)
        except PerfectSeparationWarning:
            raise ModelError("perfect separation: a predictor determines online attendance exactly, "
                             "so its odds ratio is infinite") from None
        except np.linalg.LinAlgError:
            raise ModelError("the predictors are collinear; the model cannot be estimated") from None
    converged = bool(result.mle_retvals.get("converged", False))
    if not converged or not np.all(np.isfinite(result.bse)):
        raise ModelError("the model did not converge (check for separation or very rare categories)")
    return {
        "outcome": "online_30d", "n": int(result.nobs), "n_excluded": _excluded(excluded),
        "converged": converged, "iterations": int(result.mle_retvals.get("iterations", 0)),
        "log_likelihood": _number(result.llf), "pseudo_r2": _number(result.prsquared),
        "coefficients": coefficients(result.params, result.bse, result.pvalues),
    }


# -- abstinence (GEE) --------------------------------------------------------------------------

WAVE_TERMS = ("wave[month6]", "wave[month12]")
INTERACTIONS = ("online:wave[month6]", "online:wave[month12]")
MODEL1_TERMS = ("online", *WAVE_TERMS, *INTERACTIONS, "woman", "age", "aud_severity")


def abstinence_data(frame: pd.DataFrame, variant: str | None) -> tuple[pd.DataFrame, list[str], dict[str, int]]:
    predictors = baseline_predictors(frame)
    excluded: dict[str, int] = {}
    terms = list(MODEL1_TERMS)
    if variant == "model2":
        predictors, excluded = add_group_dummies(predictors)
        terms += [*GROUP_TERMS, "multiple_groups"]
    baseline_columns = ["online", "woman", "age", "aud_severity", "multiple_groups", *(
        GROUP_TERMS if variant == "model2" else ())]
    long = frame[["participant", "wave", "abstinent_30d"]].merge(
        predictors[baseline_columns], left_on="participant", right_index=True, how="inner")
    without_baseline = frame.loc[~frame["participant"].isin(predictors.index), "participant"].nunique()
    if without_baseline:
        excluded["no baseline response (or primary group out of the model)"] = int(without_baseline)
    long["abstinent"] = long["abstinent_30d"].map({True: 1.0, False: 0.0, "true": 1.0, "false": 0.0})
    for wave_term in WAVE_TERMS:
        wave = wave_term[len("wave["):-1]
        long[wave_term] = (long["wave"] == wave).astype(float)
        long[f"online:{wave_term}"] = long["online"] * long[wave_term]
    needed = ["abstinent", *terms]
    before = long["participant"].nunique()
    long = long.dropna(subset=needed)
    dropped = before - long["participant"].nunique()
    if dropped:
        excluded["missing a model variable"] = int(dropped)
    order = {"baseline": 0, "month6": 1, "month12": 2}
    long = long.assign(_w=long["wave"].map(order)).sort_values(["participant", "_w"]).drop(columns="_w")
    return long.reset_index(drop=True), terms, excluded


def abstinence(frame: pd.DataFrame, variant: str | None = None) -> dict[str, Any]:
    long, terms, excluded = abstinence_data(frame, variant)
    x = design(long, terms)
    if long.empty or len(long) <= x.shape[1]:
        raise ModelError(f"too few complete observations ({len(long)}) for {x.shape[1]} coefficients")
    if long["abstinent"].nunique() < 2:
        raise ModelError("abstinent_30d is the same in every observation; the model cannot be estimated")
    check_design(x)
    groups = pd.factorize(long["participant"])[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("error", PerfectSeparationWarning)
        try:
            model = GEE(long["abstinent"], x, groups=groups, family=sm.families.Binomial(),
                        cov_struct=Exchangeable())
            result = model.fit(maxiter=100)
        except PerfectSeparationWarning:
            raise ModelError("perfect separation: a predictor determines abstinence exactly") from None
        except np.linalg.LinAlgError:
            raise ModelError("the predictors are collinear; the model cannot be estimated") from None
    converged = bool(getattr(result, "converged", True)) and np.all(np.isfinite(result.bse))
    if not converged:
        raise ModelError("the model did not converge")
    return {
        "outcome": "abstinent_30d", "variant": variant or "model1", "n": int(result.nobs),
        "n_participants": int(long["participant"].nunique()), "n_excluded": _excluded(excluded),
        "converged": bool(converged), "within_participant_correlation": _number(model.cov_struct.dep_params),
        "family": "binomial", "link": "logit", "working_correlation": "exchangeable", "cov_type": "robust",
        "coefficients": coefficients(result.params, result.bse, result.pvalues),
    }


def run_model(model: str, variant: str | None, frame: pd.DataFrame) -> dict[str, Any]:
    if model == "table1":
        return table1(frame)
    if model == "online_attendance":
        return online_attendance(frame)
    if model == "abstinence":
        return abstinence(frame, variant)
    raise ModelError(f"unknown model {model!r}")
