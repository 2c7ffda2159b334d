"""Fitting a resolved model spec (see `plan.resolve`) on the analysis frame: pure functions.

The frame has one row per complete response: `participant`, `wave`, the item codes and the
derived variables. The design matrix is built column by column from the spec's structured
terms (numeric, indicator, categorical levels against a reference, waves, products for
interactions); nothing is parsed as a formula.

Who is counted: the population is every participant with a complete response at the study's
first wave (the baseline); those without one are reported, not dropped silently. Each left-out
participant of the population is counted once, under the first reason that applies: a value a
variable excludes (e.g. primary group other or none), then a missing model variable.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, cast

import numpy as np
import pandas as pd
import statsmodels.api as sm
from scipy import stats as scipy_stats
from statsmodels.genmod.cov_struct import CovStruct, Exchangeable, Independence
from statsmodels.genmod.generalized_estimating_equations import GEE
from statsmodels.tools.sm_exceptions import ConvergenceWarning, PerfectSeparationWarning

from app.analysis.errors import ModelError

Z95 = float(scipy_stats.norm.ppf(0.975))
MISSING = "missing a model variable"
BOOLEAN_VALUES = {True: 1.0, False: 0.0, "true": 1.0, "false": 0.0}


def _number(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _row(term: str, b: float, se: float, p: float) -> dict[str, Any]:
    """An estimate with its odds ratio and 95 % Wald interval, exp(b -/+ z * se)."""
    return {
        "term": term, "estimate": _number(b), "std_error": _number(se), "odds_ratio": _number(math.exp(b)),
        "ci_low": _number(math.exp(b - Z95 * se)), "ci_high": _number(math.exp(b + Z95 * se)),
        "p_value": _number(p),
    }


def coefficients(params: pd.Series, bse: pd.Series, pvalues: pd.Series) -> list[dict[str, Any]]:
    return [_row(str(t), float(params[t]), float(bse[t]), float(pvalues[t])) for t in params.index]


def contrasts(spec_contrasts: list[dict[str, Any]], params: pd.Series, cov: pd.DataFrame) -> list[dict[str, Any]]:
    """Linear combinations L'b with variance L'VL (V: the fit's covariance, robust for GEE)."""
    out = []
    names = list(params.index)
    for contrast in spec_contrasts:
        weights = np.array([float(contrast["weights"].get(n, 0.0)) for n in names])
        estimate = float(weights @ params.to_numpy())
        se = math.sqrt(float(weights @ cov.loc[names, names].to_numpy() @ weights))
        p = float(2 * scipy_stats.norm.sf(abs(estimate / se))) if se > 0 else float("nan")
        out.append(_row(contrast["name"], estimate, se, p) | {"weights": contrast["weights"]})
    return out


# -- variables as columns ----------------------------------------------------------------------


def _source(rows: pd.DataFrame, frame: pd.DataFrame, var: dict[str, Any]) -> pd.Series:
    """The source value on each row: the row's own, or the participant's at the variable's wave."""
    source = var["source"]
    if source not in frame.columns:
        return pd.Series(None, index=rows.index, dtype="object")
    if var.get("at") is None:
        own: pd.Series = rows[source].astype("object")
        return own
    at_wave, positions = _at(rows, frame, var["at"])
    values = np.empty(len(rows), dtype=object)
    found = positions >= 0
    values[found] = at_wave[source].to_numpy(dtype=object)[positions[found]]
    values[~found] = None
    return pd.Series(values, index=rows.index, dtype="object")


_AT_CACHE: dict[str, tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, np.ndarray]] = {}


def _at(rows: pd.DataFrame, frame: pd.DataFrame, wave: str) -> tuple[pd.DataFrame, np.ndarray]:
    """The participants' responses at `wave` and each row's position among them (-1: none),
    computed once while a fit builds its columns from the same rows and frame (the cache holds
    both objects, so an identity match cannot be a different frame)."""
    cached = _AT_CACHE.get(wave)
    if cached is not None and cached[0] is rows and cached[1] is frame:
        return cached[2], cached[3]
    at_wave = frame.loc[frame["wave"] == wave].drop_duplicates("participant").set_index("participant")
    positions = at_wave.index.get_indexer(pd.Index(rows["participant"]))
    _AT_CACHE.clear()
    _AT_CACHE[wave] = (rows, frame, at_wave, positions)
    return at_wave, positions


def _as_float(values: pd.Series, kind: str | None) -> pd.Series:
    if kind == "boolean":
        return values.map(BOOLEAN_VALUES).astype(float)
    return pd.to_numeric(values, errors="coerce").astype(float)


def _known(values: pd.Series) -> pd.Series:
    return pd.Series(pd.notna(values.to_numpy(dtype=object)), index=values.index)


def variable_columns(rows: pd.DataFrame, frame: pd.DataFrame, name: str, var: dict[str, Any],
                     waves: list[str]) -> dict[str, pd.Series]:
    """The design columns of one variable (NaN where its source is missing or outside every level)."""
    kind = var["kind"]
    if kind == "wave":
        return {f"{name}[{w}]": (rows["wave"] == w).astype(float) for w in waves if w != var["reference"]}
    values = _source(rows, frame, var)
    if kind == "numeric" or (kind == "indicator" and var.get("codes") is None):
        return {name: _as_float(values, var.get("source_type"))}
    known = _known(values)
    if kind == "indicator":
        return {name: values.isin(var["codes"]).astype(float).where(known)}
    level_of = {code: level["name"] for level in var["levels"] for code in level["codes"]}
    levels = values.map(level_of)
    in_level = levels.notna()
    return {f"{name}[{level['name']}]": (levels == level["name"]).astype(float).where(in_level)
            for level in var["levels"] if level["name"] != var["reference"]}


def _term_columns(rows: pd.DataFrame, frame: pd.DataFrame, spec: dict[str, Any]) -> dict[str, pd.Series]:
    cache: dict[str, dict[str, pd.Series]] = {}
    waves = spec["rows_waves"]
    columns: dict[str, pd.Series] = {}
    for term in spec["terms"]:
        parts = []
        for factor in term["factors"]:
            if factor not in cache:
                cache[factor] = variable_columns(rows, frame, factor, spec["variables"][factor], waves)
            parts.append(cache[factor])
        product: dict[str, pd.Series] = {"": pd.Series(1.0, index=rows.index)}
        for part in parts:
            product = {f"{a}:{b}" if a else b: va * vb for a, va in product.items() for b, vb in part.items()}
        for column in term["columns"]:
            columns[column] = product[column]
    return columns


def _excluded(rows: pd.DataFrame, frame: pd.DataFrame, spec: dict[str, Any]) -> list[tuple[str, set[str]]]:
    """(reason, participants) for each variable of the model that leaves some values out."""
    out = []
    for var in spec["variables"].values():
        exclude = var.get("exclude")
        if exclude:
            hit = _source(rows, frame, var).isin(exclude["codes"])
            out.append((exclude["reason"], set(rows.loc[hit, "participant"])))
    return out


def _population(frame: pd.DataFrame, spec: dict[str, Any]) -> tuple[set[str], dict[str, Any]]:
    anchor = spec["anchor_wave"]
    population = set(frame.loc[frame["wave"] == anchor, "participant"])
    without = frame.loc[~frame["participant"].isin(population), "participant"].nunique()
    return population, {"wave": anchor, "participants": len(population), "without_response_at_wave": int(without)}


def _sorted(rows: pd.DataFrame, waves: list[str]) -> pd.DataFrame:
    order = {w: i for i, w in enumerate(waves)}
    keyed = rows.assign(_w=rows["wave"].map(order))
    return keyed.sort_values(["participant", "_w"], kind="mergesort").drop(columns="_w").reset_index(drop=True)


def model_data(spec: dict[str, Any], frame: pd.DataFrame) -> dict[str, Any]:
    """The outcome, the design (intercept first, then the spec's columns in order), the
    clusters, and who was left out and why (each participant once)."""
    if frame.empty:
        raise ModelError("there are no complete responses to analyse yet")
    population, described = _population(frame, spec)
    if not population:
        raise ModelError(f"there are no complete {spec['anchor_wave']} responses to analyse yet")
    rows = frame.loc[frame["participant"].isin(population) & frame["wave"].isin(spec["rows_waves"])]
    rows = _sorted(rows, spec["waves"])
    reasons: dict[str, int] = {}
    gone: set[str] = set()
    absent = population - set(rows["participant"])
    if absent:
        reasons[f"no complete response at {', '.join(spec['rows_waves'])}"] = len(absent)
        gone |= absent
    for reason, participants in _excluded(rows, frame, spec):
        new = participants - gone
        if new:
            reasons[reason] = reasons.get(reason, 0) + len(new)
            gone |= new
    rows = rows.loc[~rows["participant"].isin(gone)].reset_index(drop=True)
    outcome_var = spec["variables"][spec["outcome"]]
    y = next(iter(variable_columns(rows, frame, spec["outcome"], outcome_var, spec["rows_waves"]).values()))
    design = pd.DataFrame({"intercept": np.ones(len(rows)), **_term_columns(rows, frame, spec)}, index=rows.index)
    complete = design.notna().all(axis=1) & y.notna()
    kept_participants = set(rows.loc[complete, "participant"])
    missing = set(rows["participant"]) - kept_participants
    if missing:
        reasons[MISSING] = len(missing)
    rows, y, design = rows.loc[complete], y.loc[complete], design.loc[complete]
    return {"rows": rows, "y": y, "x": design, "population": described,
            "excluded": [{"reason": r, "n": n} for r, n in reasons.items()]}


def _check_design(spec: dict[str, Any], data: dict[str, Any]) -> None:
    x: pd.DataFrame = data["x"]
    rows: pd.DataFrame = data["rows"]
    if len(rows) <= x.shape[1]:
        raise ModelError(f"too few complete observations ({len(rows)}) for {x.shape[1]} coefficients")
    if data["y"].nunique() < 2:
        raise ModelError(f"{spec['outcome']} is the same in every observation; the model cannot be estimated")
    for name, var in spec["variables"].items():
        if var["kind"] == "categorical" and name != spec["outcome"]:
            level_of = {code: level["name"] for level in var["levels"] for code in level["codes"]}
            present = set(_source(rows, data["frame"], var).map(level_of).dropna())
            if len(present) < 2:
                raise ModelError(f"only one {name} level among the included participants "
                                 f"({', '.join(sorted(present)) or 'none'}); the model needs at least two")
    for term in x.columns[1:]:
        if x[term].nunique(dropna=True) < 2:
            raise ModelError(f"{term} takes a single value ({x[term].iloc[0]}) among the included observations; "
                             "it cannot be estimated")


# -- models ------------------------------------------------------------------------------------


def _family(name: str) -> sm.families.Family:
    families: dict[str, sm.families.Family] = {
        "binomial": sm.families.Binomial(), "gaussian": sm.families.Gaussian(), "poisson": sm.families.Poisson()}
    return families[name]


def _cov_struct(name: str) -> CovStruct:
    return Exchangeable() if name == "exchangeable" else Independence()


def _common(spec: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    rows: pd.DataFrame = data["rows"]
    return {
        "model": spec["key"], "variant": spec["variant"], "plan_version": spec["plan_version"], "kind": spec["kind"],
        "label": spec["label"], "formula": spec["formula"], "outcome": spec["outcome"],
        "family": spec["family"], "link": spec["link"],
        "n": int(rows["participant"].nunique()), "n_observations": len(rows),
        "population": data["population"], "excluded": data["excluded"],
    }


def logistic(spec: dict[str, Any], frame: pd.DataFrame) -> dict[str, Any]:
    data = model_data(spec, frame) | {"frame": frame}
    _check_design(spec, data)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PerfectSeparationWarning)
        warnings.simplefilter("ignore", ConvergenceWarning)
        try:
            result = sm.Logit(data["y"], data["x"]).fit(disp=0, method="newton", maxiter=100)
        except PerfectSeparationWarning:
            raise ModelError(f"perfect separation: a predictor determines {spec['outcome']} exactly, "
                             "so its odds ratio is infinite") from None
        except np.linalg.LinAlgError:
            raise ModelError("the predictors are collinear; the model cannot be estimated") from None
    converged = bool(result.mle_retvals.get("converged", False))
    if not converged or not np.all(np.isfinite(result.bse)):
        raise ModelError("the model did not converge (check for separation or very rare categories)")
    return _common(spec, data) | {
        "cov_type": "nonrobust", "converged": converged, "iterations": int(result.mle_retvals.get("iterations", 0)),
        "log_likelihood": _number(result.llf), "pseudo_r2": _number(result.prsquared),
        "coefficients": coefficients(result.params, result.bse, result.pvalues),
        "contrasts": contrasts(spec["contrasts"], result.params, result.cov_params()),
    }


def gee(spec: dict[str, Any], frame: pd.DataFrame) -> dict[str, Any]:
    data = model_data(spec, frame) | {"frame": frame}
    _check_design(spec, data)
    rows: pd.DataFrame = data["rows"]
    groups = pd.factorize(rows["participant"])[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("error", PerfectSeparationWarning)
        try:
            model = GEE(data["y"], data["x"], groups=groups, family=_family(spec["family"]),
                        cov_struct=_cov_struct(spec["working_correlation"]))
            result = model.fit(maxiter=100)
        except PerfectSeparationWarning:
            raise ModelError(f"perfect separation: a predictor determines {spec['outcome']} exactly") from None
        except np.linalg.LinAlgError:
            raise ModelError("the predictors are collinear; the model cannot be estimated") from None
    converged = bool(getattr(result, "converged", True)) and bool(np.all(np.isfinite(result.bse)))
    if not converged:
        raise ModelError("the model did not converge")
    dep = model.cov_struct.dep_params
    by_wave = rows["wave"].value_counts()
    return _common(spec, data) | {
        "n_by_wave": {w: int(by_wave.get(w, 0)) for w in spec["rows_waves"]},
        "working_correlation": spec["working_correlation"], "cluster": spec["cluster"], "cov_type": "robust",
        "converged": converged, "iterations": len(model.fit_history.get("params", [])) or None,
        "within_participant_correlation": _number(dep) if np.isscalar(dep) else None,
        "coefficients": coefficients(result.params, result.bse, result.pvalues),
        "contrasts": contrasts(spec["contrasts"], result.params, result.cov_params()),
    }


# -- table 1 -----------------------------------------------------------------------------------


def table1(spec: dict[str, Any], frame: pd.DataFrame) -> dict[str, Any]:
    if frame.empty:
        raise ModelError("there are no complete responses to describe yet")
    population, described = _population(frame, spec)
    wave = spec["rows_waves"][0]
    base = frame.loc[(frame["wave"] == wave) & frame["participant"].isin(population)].drop_duplicates("participant")
    if base.empty:
        raise ModelError(f"there are no complete {wave} responses to describe yet")
    by_name = spec["by"]
    by = next(iter(variable_columns(base, frame, by_name, spec["variables"][by_name], [wave]).values()))
    known = by.notna()
    names = (by_name, f"not_{by_name}")
    groups = {names[0]: base.loc[known & (by == 1.0)], names[1]: base.loc[known & (by == 0.0)]}
    if min(len(g) for g in groups.values()) == 0:
        raise ModelError(f"everyone (or no one) has {by_name}; there is nothing to compare")
    variables: list[dict[str, Any]] = []
    for item in spec["describe"]:
        if item["type"] in ("integer", "number"):
            variables.append(_continuous(item["code"], groups))
        else:
            variables.append(_categorical(item, groups))
    flagged = [v["variable"] for v in variables if v.get("expected_below_5")]
    return {
        "model": spec["key"], "variant": None, "plan_version": spec["plan_version"], "kind": "table1",
        "label": spec["label"], "formula": spec["formula"], "by": by_name, "groups": list(groups),
        "n": {k: len(v) for k, v in groups.items()}, "population": described,
        "excluded": [{"reason": f"{by_name} missing", "n": int((~known).sum())}] if (~known).any() else [],
        "variables": variables,
        "notes": [f"expected count under 5 in: {', '.join(flagged)} (chi-square may be unreliable)"]
        if flagged else [],
    }


def _categorical(item: dict[str, Any], groups: dict[str, pd.DataFrame]) -> dict[str, Any]:
    name = item["code"]
    boolean = item["type"] == "boolean"
    levels = ["true", "false"] if boolean else list(item["options"])

    def labels(g: pd.DataFrame) -> pd.Series:
        if name not in g.columns:
            return pd.Series([], dtype="object")
        values = g[name].astype("object")
        mapped: pd.Series = (values.map({True: "true", False: "false", "true": "true", "false": "false"}) if boolean
                             else values.map(lambda v: v if isinstance(v, str) else None))
        return mapped.dropna()

    values = {k: labels(g) for k, g in groups.items()}
    table = np.array([[int((values[k] == level).sum()) for k in groups] for level in levels])
    row: dict[str, Any] = {"variable": name, "type": "categorical", "levels": [
        {"level": level, **{k: {"n": int(table[i, j]), "pct": _pct(int(table[i, j]), int(table[:, j].sum()))}
                            for j, k in enumerate(groups)}}
        for i, level in enumerate(levels)
    ], "test": "chi-square"}
    observed = table[table.sum(axis=1) > 0]
    if len(observed) >= 2 and observed.sum(axis=0).min() > 0:
        chi2, p, dof, expected = scipy_stats.chi2_contingency(observed, correction=False)
        row.update(statistic=_number(chi2), df=int(dof), p_value=_number(p),
                   expected_below_5=bool((expected < 5).any()), min_expected=_number(expected.min()))
    else:
        row.update(statistic=None, df=None, p_value=None, expected_below_5=None, min_expected=None)
    return row


def _pct(n: int, total: int) -> float | None:
    return 100.0 * n / total if total else None


def _numbers(group: pd.DataFrame, name: str) -> pd.Series[float]:
    if name not in group.columns:
        return cast("pd.Series[float]", pd.Series(np.array([], dtype=float)))
    return pd.to_numeric(group[name], errors="coerce").astype(float).dropna()


def _continuous(name: str, groups: dict[str, pd.DataFrame]) -> dict[str, Any]:
    values = {k: _numbers(g, name) for k, g in groups.items()}
    row: dict[str, Any] = {"variable": name, "type": "continuous", "test": "welch-t"}
    for k, v in values.items():
        row[k] = {"n": len(v), "mean": _number(v.mean()) if len(v) else None,
                  "sd": _number(v.std(ddof=1)) if len(v) > 1 else None}
    a, b = values.values()
    if len(a) > 1 and len(b) > 1 and (a.var() > 0 or b.var() > 0):
        test = scipy_stats.ttest_ind(a, b, equal_var=False)
        row.update(statistic=_number(test.statistic), df=_number(test.df), p_value=_number(test.pvalue))
    else:
        row.update(statistic=None, df=None, p_value=None)
    return row


def run(spec: dict[str, Any], frame: pd.DataFrame) -> dict[str, Any]:
    try:
        if spec["kind"] == "table1":
            return table1(spec, frame)
        if spec["kind"] == "logistic":
            return logistic(spec, frame)
        return gee(spec, frame)
    finally:
        _AT_CACHE.clear()  # do not keep the frame alive after the fit
