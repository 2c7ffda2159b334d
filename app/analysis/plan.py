"""The analysis plan: each study's models as a versioned document (data, never code).

A plan names variables (codebook items or derived variables, optionally recoded into levels
with a reference, optionally taken from one wave) and models (`table1`, `logistic`, `gee`)
whose terms are names of those variables or interactions between them. `check` validates
every name against the codebook and reports each problem with its path; `resolve` turns one
model of a plan (or a one-off spec) into a self-contained JSON spec that the fit reads with
the analysis frame. No text from a plan is evaluated: names are looked up, never run, and the
design matrix is built column by column from the structured terms (see `fit.py`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.core.errors import FieldError, Invalid
from app.instruments.codebook import Codebook

NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
LEVEL = r"^[a-z0-9][a-z0-9_]{0,62}$"
PLANS_DIR = Path(__file__).resolve().parents[1] / "instruments" / "codebooks"
NUMERIC_TYPES = ("boolean", "integer", "number")
CHOICE_TYPES = ("single_choice",)
INTERCEPT = "intercept"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LevelDoc(_Strict):
    name: str = Field(pattern=LEVEL, description="the level's name; a term is `variable[name]`")
    codes: list[str] = Field(min_length=1, description="option codes of the source item that form this level")


class ExcludeDoc(_Strict):
    codes: list[str] = Field(min_length=1, description="option codes whose participants leave the model")
    reason: str = Field(min_length=1, max_length=200, description="reported in the result's `excluded`")


class VariableDoc(_Strict):
    kind: Literal["numeric", "indicator", "categorical", "wave"] = Field(description=(
        "numeric: the value (booleans 1/0); indicator: 1 when the source is one of `codes`; categorical: "
        "one column per level but the reference; wave: one column per wave of the model's rows but the reference"))
    source: str | None = Field(default=None, description="item or derived variable code (not for `wave`)")
    at: str | None = Field(default=None, description=(
        "a wave key: the participant's value at that wave, on every row (time invariant); default: the row's own"))
    codes: list[str] | None = Field(default=None, description="indicator: option codes counted as 1")
    levels: list[LevelDoc] | None = Field(default=None, description="categorical: the levels, in term order")
    reference: str | None = Field(default=None, description="categorical: a level name; wave: a wave key")
    exclude: ExcludeDoc | None = Field(default=None, description=(
        "participants whose value is one of these codes are left out of every model using this variable"))
    label: str | None = Field(default=None, max_length=200)


class InteractionDoc(_Strict):
    interaction: list[str] = Field(min_length=2, max_length=3, description="variable names")


Term = Annotated[str | InteractionDoc, Field(description="a variable name, or {interaction: [a, b]}")]


class RowsDoc(_Strict):
    waves: list[str] | None = Field(default=None, min_length=1,
                                    description="wave keys of the rows used (default: every wave)")


class ContrastDoc(_Strict):
    name: str = Field(min_length=1, max_length=100)
    weights: dict[str, float] = Field(min_length=1, description="term -> weight: the linear combination")


class VariantDoc(_Strict):
    add_terms: list[Term] = Field(min_length=1)
    label: str | None = Field(default=None, max_length=200)


class ModelDoc(_Strict):
    kind: Literal["table1", "logistic", "gee"]
    label: str | None = Field(default=None, max_length=200)
    outcome: str | None = Field(default=None, description="logistic, gee: a variable name or a codebook code")
    terms: list[Term] = Field(default_factory=list, description="after the intercept, in this order")
    by: str | None = Field(default=None, description="table1: the two groups compared (a 0/1 variable)")
    describe: list[str] = Field(default_factory=list, description="table1: codebook codes, in row order")
    family: Literal["binomial", "gaussian", "poisson"] = "binomial"
    link: Literal["logit", "identity", "log"] = "logit"
    working_correlation: Literal["exchangeable", "independence"] | None = Field(
        default=None, description="gee: the working correlation")
    cluster: Literal["participant"] | None = Field(default=None, description="gee: the clusters")
    rows: RowsDoc = Field(default_factory=RowsDoc)
    contrasts: list[ContrastDoc] = Field(default_factory=list)
    variants: dict[str, VariantDoc] = Field(default_factory=dict)


class PlanDoc(_Strict):
    variables: dict[str, VariableDoc] = Field(default_factory=dict)
    models: dict[str, ModelDoc] = Field(default_factory=dict)


class SpecDoc(ModelDoc):
    """A one-off model: a plan model plus, optionally, variables of its own (over the plan's)."""

    variables: dict[str, VariableDoc] = Field(default_factory=dict)


CANONICAL_LINK = {"binomial": "logit", "gaussian": "identity", "poisson": "log"}


def _err(loc: list[str | int], code: str, message: str) -> FieldError:
    return {"loc": loc, "code": code, "message": message}


def parse(document: Any, model: type[BaseModel], loc_prefix: tuple[str | int, ...] = ()) -> Any:
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        errors = [_err([*loc_prefix, *e["loc"]], e["type"], e["msg"]) for e in exc.errors(include_url=False)]
        raise Invalid(f"the analysis plan has {len(errors)} problem(s)", errors=errors) from None


class _Checker:
    """Every name of a plan against the codebook; collects errors with their paths."""

    def __init__(self, codebook: Codebook, variables: dict[str, VariableDoc]) -> None:
        self.codebook = codebook
        self.variables = variables
        self.types = {code: item.type for code, item in codebook.items.items()}
        self.types.update({d.code: d.type for d in codebook.derived})
        self.errors: list[FieldError] = []

    def error(self, loc: list[str | int], code: str, message: str) -> None:
        self.errors.append(_err(loc, code, message))

    def options(self, code: str) -> list[str]:
        for inst in self.codebook.document.get("instruments", []):
            for item in inst["items"]:
                if item["code"] == code:
                    return [o["code"] for o in item.get("options") or []]
        return []

    def wave(self, loc: list[str | int], key: str) -> None:
        if key not in self.codebook.wave_keys:
            self.error(loc, "unknown_wave", f"the study has no wave {key!r} (waves: "
                                            f"{', '.join(self.codebook.wave_keys)})")

    def variable(self, loc: list[str | int], name: str, v: VariableDoc) -> None:
        if not NAME.match(name):
            self.error(loc, "name", "a variable name is lowercase letters, digits and _ (a name, not code)")
        if v.at is not None:
            self.wave([*loc, "at"], v.at)
        if v.kind == "wave":
            if v.source is not None:
                self.error([*loc, "source"], "not_allowed", "a wave variable has no source")
            if v.reference is None:
                self.error([*loc, "reference"], "required", "a wave variable needs a reference wave")
            else:
                self.wave([*loc, "reference"], v.reference)
            return
        if v.source is None:
            self.error([*loc, "source"], "required", f"a {v.kind} variable needs a source item")
            return
        kind = self.types.get(v.source)
        if kind is None:
            self.error([*loc, "source"], "unknown_variable",
                       f"{v.source!r} is neither an item nor a derived variable of the codebook")
            return
        options = self.options(v.source)
        if v.kind == "numeric":
            if kind not in NUMERIC_TYPES:
                self.error([*loc, "source"], "type", f"{v.source} is {kind}; numeric needs boolean/integer/number")
        elif v.kind == "indicator":
            if v.codes is None:
                if kind != "boolean":
                    self.error([*loc, "codes"], "required", f"{v.source} is {kind}: name the codes counted as 1")
            else:
                self._codes([*loc, "codes"], v.source, v.codes, options, kind)
        else:
            self._categorical(loc, v, options, kind)
        if v.exclude is not None:
            self._codes([*loc, "exclude", "codes"], v.source, v.exclude.codes, options, kind)
            used = {c for level in v.levels or [] for c in level.codes} | set(v.codes or [])
            for j, c in enumerate(v.exclude.codes):
                if c in used:
                    self.error([*loc, "exclude", "codes", j], "conflict", f"{c!r} is both used and excluded")

    def _codes(self, loc: list[str | int], source: str, codes: list[str], options: list[str], kind: str) -> None:
        if kind not in CHOICE_TYPES:
            self.error(loc, "type", f"{source} is {kind}; codes apply to single-choice items")
            return
        for j, c in enumerate(codes):
            if c not in options:
                self.error([*loc, j], "unknown_level", f"{c!r} is not an option of {source} "
                                                       f"({', '.join(options)})")

    def _categorical(self, loc: list[str | int], v: VariableDoc, options: list[str], kind: str) -> None:
        assert v.source is not None
        if v.levels is None:
            self.error([*loc, "levels"], "required", "a categorical variable needs levels")
            return
        seen: set[str] = set()
        names = [level.name for level in v.levels]
        for j, level in enumerate(v.levels):
            self._codes([*loc, "levels", j, "codes"], v.source, level.codes, options, kind)
            for c in level.codes:
                if c in seen:
                    self.error([*loc, "levels", j, "codes"], "duplicate", f"{c!r} is in two levels")
                seen.add(c)
            if names.count(level.name) > 1:
                self.error([*loc, "levels", j, "name"], "duplicate", f"level {level.name!r} is named twice")
        if len(v.levels) < 2:
            self.error([*loc, "levels"], "too_few", "a categorical variable needs at least two levels")
        if v.reference is None:
            self.error([*loc, "reference"], "required", "name the reference level")
        elif v.reference not in names:
            self.error([*loc, "reference"], "unknown_level", f"{v.reference!r} is not one of the levels "
                                                             f"({', '.join(names)})")

    def term_names(self, loc: list[str | int], term: str | InteractionDoc, waves: list[str]) -> list[str]:
        """The columns a term adds to the design (empty, with an error, if a name is unknown)."""
        if isinstance(term, InteractionDoc):
            parts = [self.term_names([*loc, "interaction", j], name, waves) for j, name in enumerate(term.interaction)]
            if any(not p for p in parts):
                return []
            names = [""]
            for columns in parts:
                names = [f"{a}:{b}" if a else b for a in names for b in columns]
            return names
        v = self.variables.get(term)
        if v is None:
            kind = self.types.get(term)
            if kind is None:
                self.error(loc, "unknown_variable", f"{term!r} is not a variable of the plan, nor a codebook "
                                                    "item or derived variable")
                return []
            if kind not in NUMERIC_TYPES:
                self.error(loc, "type", f"{term} is {kind}: declare it as a plan variable with levels")
                return []
            return [term]
        if v.kind == "categorical":
            return [f"{term}[{level.name}]" for level in v.levels or [] if level.name != v.reference]
        if v.kind == "wave":
            return [f"{term}[{w}]" for w in waves if w != v.reference]
        return [term]

    def single_column(self, loc: list[str | int], name: str, waves: list[str]) -> None:
        """An outcome or a table's `by`: one column (numeric or indicator), not levels."""
        v = self.variables.get(name)
        if v is not None and v.kind in ("categorical", "wave"):
            self.error(loc, "type", f"{name} is {v.kind}; use a numeric or indicator variable here")
            return
        self.term_names(loc, name, waves)

    def model(self, loc: list[str | int], key: str, m: ModelDoc) -> list[str]:
        if not NAME.match(key):
            self.error(loc, "name", "a model key is lowercase letters, digits and _")
        waves = list(self.codebook.wave_keys)
        if m.rows.waves is not None:
            for j, w in enumerate(m.rows.waves):
                self.wave([*loc, "rows", "waves", j], w)
            waves = [w for w in self.codebook.wave_keys if w in m.rows.waves]
        for t, term in enumerate(m.terms):
            if isinstance(term, str) and term in self.variables and self.variables[term].kind == "wave":
                reference = self.variables[term].reference
                if reference in self.codebook.wave_keys and reference not in waves:
                    self.error([*loc, "terms", t], "unknown_wave", f"the reference wave {reference!r} is not "
                                                                   "among the model's rows")
        if m.kind == "table1":
            return self._table1(loc, m)
        if m.outcome is None:
            self.error([*loc, "outcome"], "required", f"a {m.kind} model needs an outcome")
        else:
            self.single_column([*loc, "outcome"], m.outcome, waves)
        if m.kind == "logistic" and (m.family, m.link) != ("binomial", "logit"):
            self.error([*loc, "family"], "not_allowed", "a logistic model is binomial with the logit link")
        if CANONICAL_LINK[m.family] != m.link:
            self.error([*loc, "link"], "not_allowed", f"the {m.family} family takes the "
                                                      f"{CANONICAL_LINK[m.family]} link")
        if m.kind == "gee":
            if m.working_correlation is None:
                self.error([*loc, "working_correlation"], "required", "a GEE model needs a working correlation")
            if m.cluster is None:
                self.error([*loc, "cluster"], "required", "a GEE model needs its clusters (participant)")
        names = [INTERCEPT]
        for t, term in enumerate(m.terms):
            names += self.term_names([*loc, "terms", t], term, waves)
        for name in sorted({n for n in names if names.count(n) > 1}):
            self.error([*loc, "terms"], "duplicate", f"the term {name} appears twice")
        for c, contrast in enumerate(m.contrasts):
            for term in contrast.weights:
                if term not in names:
                    self.error([*loc, "contrasts", c, "weights", term], "unknown_term",
                               f"{term!r} is not a term of this model ({', '.join(names)})")
        for variant, doc in m.variants.items():
            if not NAME.match(variant):
                self.error([*loc, "variants", variant], "name", "a variant key is lowercase letters, digits and _")
            extra = []
            for t, term in enumerate(doc.add_terms):
                extra += self.term_names([*loc, "variants", variant, "add_terms", t], term, waves)
            for name in extra:
                if name in names:
                    self.error([*loc, "variants", variant, "add_terms"], "duplicate", f"{name} is already a term")
        return names

    def _table1(self, loc: list[str | int], m: ModelDoc) -> list[str]:
        if m.by is None:
            self.error([*loc, "by"], "required", "table1 needs `by`, the 0/1 variable splitting the groups")
        else:
            self.single_column([*loc, "by"], m.by, [])
        if not m.describe:
            self.error([*loc, "describe"], "required", "table1 needs the codes it describes")
        for j, code in enumerate(m.describe):
            if code not in self.types:
                self.error([*loc, "describe", j], "unknown_variable", f"{code!r} is not in the codebook")
            elif self.types[code] == "text":
                self.error([*loc, "describe", j], "type", f"{code} is free text")
        return []


def check(plan: PlanDoc, codebook: Codebook, *, loc_prefix: tuple[str | int, ...] = ()) -> None:
    checker = _Checker(codebook, plan.variables)
    for name, v in plan.variables.items():
        checker.variable([*loc_prefix, "variables", name], name, v)
    for key, m in plan.models.items():
        checker.model([*loc_prefix, "models", key], key, m)
    if checker.errors:
        raise Invalid(f"the analysis plan has {len(checker.errors)} problem(s)", errors=checker.errors)


def check_spec(spec: SpecDoc, plan: PlanDoc, codebook: Codebook) -> None:
    variables = {**plan.variables, **spec.variables}
    checker = _Checker(codebook, variables)
    for name, v in spec.variables.items():
        checker.variable(["spec", "variables", name], name, v)
    checker.model(["spec"], "spec", spec)
    if checker.errors:
        raise Invalid(f"the spec has {len(checker.errors)} problem(s)", errors=checker.errors)


def _names_used(m: ModelDoc, terms: list[str | InteractionDoc]) -> list[str]:
    used: list[str] = []
    for name in [m.outcome, m.by, *[p for t in terms for p in (t.interaction if isinstance(t, InteractionDoc)
                                                                else [t])]]:
        if name is not None and name not in used:
            used.append(name)
    return used


def resolve(m: ModelDoc, variables: dict[str, VariableDoc], variant: str | None, codebook: Codebook,
            *, key: str, plan_version: int | None) -> dict[str, Any]:
    """A self-contained spec for one fit: the model with its variant applied, the variables it
    names (with their codebook types and option order) and the study's waves."""
    terms: list[str | InteractionDoc] = list(m.terms)
    if variant is not None:
        terms += m.variants[variant].add_terms
    checker = _Checker(codebook, variables)
    waves = [w for w in codebook.wave_keys if m.rows.waves is None or w in m.rows.waves]
    term_columns = [(t, checker.term_names([], t, waves)) for t in terms]
    assert not checker.errors, checker.errors  # checked when the plan or spec was accepted
    used: dict[str, Any] = {}
    for name in _names_used(m, terms):
        doc = variables.get(name) or VariableDoc(kind="numeric", source=name)
        used[name] = {**doc.model_dump(exclude_none=True),
                      "source_type": checker.types.get(doc.source or "", None)}
    describe = [{"code": code, "type": checker.types[code], "options": checker.options(code)}
                for code in m.describe]
    return {
        "key": key, "variant": variant, "plan_version": plan_version, "kind": m.kind,
        "label": (m.variants[variant].label if variant and m.variants[variant].label else m.label),
        "outcome": m.outcome, "by": m.by, "describe": describe,
        "terms": [{"factors": t.interaction if isinstance(t, InteractionDoc) else [t], "columns": columns}
                  for t, columns in term_columns],
        "variables": used, "family": m.family, "link": m.link,
        "working_correlation": m.working_correlation, "cluster": m.cluster,
        "waves": list(codebook.wave_keys), "rows_waves": waves, "anchor_wave": codebook.wave_keys[0],
        "contrasts": [c.model_dump() for c in m.contrasts],
        "formula": formula(m, terms),
    }


def formula(m: ModelDoc, terms: list[str | InteractionDoc]) -> str:
    """The model as a readable formula (for people; never parsed)."""
    if m.kind == "table1":
        return f"{', '.join(m.describe)} by {m.by}"
    right = " + ".join(["1", *(":".join(t.interaction) if isinstance(t, InteractionDoc) else t for t in terms)])
    return f"{m.outcome} ~ {right}"


def shipped_plan(codebook_key: str) -> dict[str, Any] | None:
    """The plan a template ships with its codebook (`<codebook key>.plan.json`), if any."""
    path = PLANS_DIR / f"{codebook_key}.plan.json"
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", codebook_key) or not path.exists():
        return None
    document: dict[str, Any] = json.loads(path.read_text())
    return document
