"""The codebook format: waves, instruments and items, cross-item rules and derived variables.

A codebook is data (`codebooks/*.json` or an uploaded document). This module checks one
for consistency, reporting every problem with its path, and compiles it into the lookup
structures that answer validation and derived variables use.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.core.errors import FieldError, Invalid
from app.instruments.derived import DefinitionError, DerivedVariable, compile_derived

ItemType = Literal["single_choice", "multi_choice", "integer", "number", "boolean", "text", "date"]
CHOICE_TYPES = frozenset({"single_choice", "multi_choice"})
NUMERIC_TYPES = frozenset({"integer", "number"})
CONDITION_OPERATORS = ("in", "not_in", "==", "!=", ">", ">=", "<", "<=", "exists")
RULE_OPERATORS = ("<", "<=", ">", ">=", "==", "!=")

CODE = r"^[a-z][a-z0-9_]{0,99}$"
OPTION_CODE = r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}$"
KEY = r"^[a-z0-9][a-z0-9_-]{0,62}$"

TEMPLATES = {"pal-replication": "pal-v1.json"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


LANGUAGE = r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})?$"
# translations by language code, e.g. {"en": "Age", "es": "Edad"}
Labels = dict[Annotated[str, Field(pattern=LANGUAGE)], Annotated[str, Field(min_length=1)]] | None


class OptionDoc(_Strict):
    code: str = Field(pattern=OPTION_CODE)
    label: str = Field(min_length=1)
    labels: Labels = None


class ConditionDoc(_Strict):
    item: str
    operator: Literal["in", "not_in", "==", "!=", ">", ">=", "<", "<=", "exists"]
    value: Any = None


class ItemDoc(_Strict):
    code: str = Field(pattern=CODE)
    type: ItemType
    label: str = Field(min_length=1)
    labels: Labels = None
    options: list[OptionDoc] | None = None
    min: int | float | None = None
    max: int | float | None = None
    required: bool = False
    waves: list[str] = Field(min_length=1)
    enable_when: ConditionDoc | None = None
    max_length: int | None = Field(default=None, ge=1)
    description: str | None = None


class InstrumentDoc(_Strict):
    key: str = Field(pattern=CODE)
    label: str = Field(min_length=1)
    labels: Labels = None
    waves: list[str] = Field(min_length=1)
    items: list[ItemDoc] = Field(min_length=1)
    description: str | None = None


class WaveDoc(_Strict):
    key: str = Field(pattern=KEY)
    label: str = Field(min_length=1)
    offset_days: int = Field(ge=0, le=36500)
    window_open_days: int = Field(ge=0, le=36500)
    window_close_days: int = Field(ge=0, le=36500)


class ReminderPolicyDoc(_Strict):
    invite_on_open: bool = True
    reminder_days_after_open: list[int] = Field(default_factory=list)
    final_days_before_close: int | None = None
    channel: Literal["email"] = "email"


class RuleDoc(_Strict):
    code: str = Field(pattern=CODE)
    left: str
    operator: Literal["<", "<=", ">", ">=", "==", "!="]
    right: str | int | float
    message: str = Field(min_length=1)


class DerivedDoc(_Strict):
    code: str = Field(pattern=CODE)
    type: Literal["boolean", "integer", "number", "text"]
    definition: str = Field(min_length=1)
    expression: str | None = Field(default=None, min_length=1, description=(
        "the definition in the expression language when `definition` is prose for readers; "
        "when present it is what is evaluated"))
    description: str | None = None


class CodebookDoc(_Strict):
    key: str = Field(pattern=KEY)
    version: int = Field(ge=1)
    title: str = Field(min_length=1)
    waves: list[WaveDoc] = Field(min_length=1)
    reminder_policy: ReminderPolicyDoc = Field(default_factory=ReminderPolicyDoc)
    instruments: list[InstrumentDoc] = Field(min_length=1)
    rules: list[RuleDoc] = Field(default_factory=list)
    derived: list[DerivedDoc] = Field(default_factory=list)


@dataclass(frozen=True)
class Item:
    code: str
    type: str
    instrument: str
    required: bool
    waves: frozenset[str]
    options: frozenset[str] = frozenset()
    min: float | None = None
    max: float | None = None
    max_length: int | None = None
    enable_when: ConditionDoc | None = None


@dataclass(frozen=True, eq=False)  # identity hash: compiled once per document and cached
class Codebook:
    """A validated codebook, compiled for fast lookups; `document` is kept exactly as received."""

    document: dict[str, Any]
    items: dict[str, Item]
    wave_keys: tuple[str, ...]
    rules: tuple[RuleDoc, ...]
    derived: tuple[DerivedVariable, ...]
    items_by_wave: dict[str, tuple[Item, ...]] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return str(self.document["key"])

    @property
    def version(self) -> int:
        return int(self.document["version"])

    @cached_property
    def sha256(self) -> str:
        return document_sha256(self.document)

    @cached_property
    def derived_signature(self) -> str:
        """Changes when any derived definition changes; stored rows with another one are recomputed."""
        payload: list[list[Any]] = [[d.code, d.type, d.definition] for d in self.derived]
        expressions = [[d.code, d.expression] for d in self.derived if d.expression is not None]
        if expressions:  # signatures of codebooks without separate expressions stay as they were
            payload.append(expressions)
        return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]

    def waves(self) -> list[dict[str, Any]]:
        return list(self.document["waves"])

    def reminder_policy(self) -> dict[str, Any]:
        policy: dict[str, Any] = self.document.get("reminder_policy") or ReminderPolicyDoc().model_dump()
        return policy


def document_sha256(document: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(document, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _err(loc: list[str | int], code: str, message: str) -> FieldError:
    return {"loc": loc, "code": code, "message": message}


def _repeats(values: list[str]) -> list[tuple[int, str]]:
    """(index, value) of every occurrence after the first of a value."""
    seen: set[str] = set()
    out = []
    for i, v in enumerate(values):
        if v in seen:
            out.append((i, v))
        seen.add(v)
    return out


def _check_condition(
    loc: list[str | int], item: ItemDoc, cond: ConditionDoc, by_code: dict[str, ItemDoc]
) -> list[FieldError]:
    errors: list[FieldError] = []
    if cond.item == item.code:
        return [_err([*loc, "item"], "self_reference", f"{item.code} cannot depend on itself")]
    target = by_code.get(cond.item)
    if target is None:
        return [_err([*loc, "item"], "unknown_reference", f"enable_when refers to unknown item {cond.item!r}")]
    missing = sorted(set(item.waves) - set(target.waves))
    if missing:
        errors.append(_err([*loc, "item"], "reference_not_in_wave",
                           f"{cond.item!r} is not asked at {', '.join(missing)} where {item.code!r} is"))
    if cond.operator == "exists":
        return errors
    if cond.operator in ("in", "not_in"):
        if not isinstance(cond.value, list) or not cond.value:
            errors.append(_err([*loc, "value"], "type", f"operator {cond.operator} needs a non-empty list"))
            return errors
        values = cond.value
    else:
        values = [cond.value]
    options = {o.code for o in target.options or []}
    for value in values:
        if target.type in CHOICE_TYPES and value not in options:
            errors.append(_err([*loc, "value"], "option", f"{value!r} is not an option of {cond.item!r}"))
        elif target.type in NUMERIC_TYPES and (isinstance(value, bool) or not isinstance(value, int | float)):
            errors.append(_err([*loc, "value"], "type", f"{cond.item!r} is numeric; {value!r} is not a number"))
        elif target.type == "boolean" and not isinstance(value, bool):
            errors.append(_err([*loc, "value"], "type", f"{cond.item!r} is boolean; {value!r} is not"))
    if cond.operator in (">", ">=", "<", "<=") and target.type not in NUMERIC_TYPES:
        errors.append(_err([*loc, "operator"], "type", f"{cond.operator} needs a numeric item"))
    return errors


def _check_cycles(items: list[tuple[list[str | int], ItemDoc]]) -> list[FieldError]:
    depends = {it.code: it.enable_when.item for _, it in items if it.enable_when is not None}
    errors = []
    for loc, it in items:
        seen = {it.code}
        cur = depends.get(it.code)
        while cur is not None:
            if cur in seen:
                errors.append(_err([*loc, "enable_when", "item"], "cycle",
                                   f"enable_when of {it.code!r} forms a cycle"))
                break
            seen.add(cur)
            cur = depends.get(cur)
    return errors


def check_document(doc: CodebookDoc) -> list[FieldError]:
    """Everything the schema cannot express: references, duplicates, ranges, waves."""
    errors: list[FieldError] = []
    wave_keys = [w.key for w in doc.waves]
    for i, dup in _repeats(wave_keys):
        errors.append(_err(["waves", i, "key"], "duplicate", f"wave {dup!r} is declared twice"))
    for i, w in enumerate(doc.waves):
        if not w.window_open_days <= w.offset_days <= w.window_close_days:
            errors.append(_err(["waves", i], "range",
                               "window_open_days <= offset_days <= window_close_days must hold"))
    known_waves = set(wave_keys)

    inst_keys = [inst.key for inst in doc.instruments]
    for i, dup in _repeats(inst_keys):
        errors.append(_err(["instruments", i, "key"], "duplicate", f"instrument {dup!r} is declared twice"))

    located: list[tuple[list[str | int], ItemDoc]] = []
    for i, inst in enumerate(doc.instruments):
        for wave in sorted(set(inst.waves) - known_waves):
            errors.append(_err(["instruments", i, "waves"], "unknown_wave", f"unknown wave {wave!r}"))
        for j, item in enumerate(inst.items):
            located.append((["instruments", i, "items", j], item))
    seen_codes: dict[str, list[str | int]] = {}
    for loc, item in located:
        if item.code in seen_codes:
            errors.append(_err([*loc, "code"], "duplicate", f"item code {item.code!r} is used twice"))
        seen_codes.setdefault(item.code, loc)
    by_code = {item.code: item for _, item in reversed(located)}

    for loc, item in located:
        inst = doc.instruments[int(loc[1])]
        for wave in sorted(set(item.waves) - known_waves):
            errors.append(_err([*loc, "waves"], "unknown_wave", f"unknown wave {wave!r}"))
        for wave in sorted((set(item.waves) & known_waves) - set(inst.waves)):
            errors.append(_err([*loc, "waves"], "not_in_instrument_waves",
                               f"wave {wave!r} is not a wave of instrument {inst.key!r}"))
        if item.type in CHOICE_TYPES:
            if not item.options:
                errors.append(_err([*loc, "options"], "options_required", f"{item.type} items need options"))
            else:
                codes = [o.code for o in item.options]
                for k, dup in _repeats(codes):
                    errors.append(_err([*loc, "options", k, "code"], "duplicate", f"option {dup!r} is listed twice"))
        elif item.options is not None:
            errors.append(_err([*loc, "options"], "options_not_allowed", f"{item.type} items take no options"))
        if item.type in NUMERIC_TYPES:
            if item.type == "integer":
                for bound in ("min", "max"):
                    value = getattr(item, bound)
                    if value is not None and not isinstance(value, int):
                        errors.append(_err([*loc, bound], "type", f"{bound} of an integer item must be whole"))
            if item.min is not None and item.max is not None and item.min > item.max:
                errors.append(_err([*loc, "min"], "range", "min is greater than max"))
        elif item.min is not None or item.max is not None:
            errors.append(_err([*loc, "min" if item.min is not None else "max"], "range_not_allowed",
                               f"{item.type} items take no min/max"))
        if item.max_length is not None and item.type != "text":
            errors.append(_err([*loc, "max_length"], "range_not_allowed", "only text items take max_length"))
        if item.enable_when is not None:
            errors.extend(_check_condition([*loc, "enable_when"], item, item.enable_when, by_code))
    errors.extend(_check_cycles(located))

    rule_codes = [r.code for r in doc.rules]
    for i, dup in _repeats(rule_codes):
        errors.append(_err(["rules", i, "code"], "duplicate", f"rule {dup!r} is declared twice"))
    for i, rule in enumerate(doc.rules):
        sides: list[tuple[str, str | int | float]] = [("left", rule.left)]
        if isinstance(rule.right, str):
            sides.append(("right", rule.right))
        for side, ref in sides:
            target = by_code.get(str(ref))
            if target is None:
                errors.append(_err(["rules", i, side], "unknown_reference", f"rule refers to unknown item {ref!r}"))
            elif rule.operator not in ("==", "!=") and target.type not in NUMERIC_TYPES | {"date"}:
                errors.append(_err(["rules", i, side], "type",
                                   f"{rule.operator} compares numbers or dates; {ref!r} is {target.type}"))

    derived_codes = [d.code for d in doc.derived]
    for i, dup in _repeats(derived_codes):
        errors.append(_err(["derived", i, "code"], "duplicate", f"derived variable {dup!r} is declared twice"))
    for i, d in enumerate(doc.derived):
        if d.code in by_code:
            errors.append(_err(["derived", i, "code"], "duplicate", f"{d.code!r} is also an item code"))
    available = {code: item.type for code, item in by_code.items()}
    for i, d in enumerate(doc.derived):
        try:
            compile_derived(d.code, d.type, d.definition, available, expression=d.expression)
        except DefinitionError as exc:
            field = "expression" if d.expression is not None else "definition"
            errors.append(_err(["derived", i, field], "definition", str(exc)))
        available[d.code] = d.type
    return errors


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _control_characters(value: Any, loc: list[str | int]) -> list[dict[str, Any]]:
    """Labels and codes end up in mail headers, CSV cells and pages: no control characters (CR, LF, NUL...)."""
    if isinstance(value, str):
        return [_err(loc, "control_character", "text may not contain control characters (line breaks, tabs, NUL)")
                ] if _CONTROL.search(value) else []
    if isinstance(value, dict):
        return [e for k, v in value.items() for e in _control_characters(v, [*loc, k])]
    if isinstance(value, list):
        return [e for i, v in enumerate(value) for e in _control_characters(v, [*loc, i])]
    return []


def parse_codebook(document: Any, *, loc_prefix: tuple[str | int, ...] = ()) -> Codebook:
    """Validate a codebook document; raise `Invalid` listing every problem with its path."""
    try:
        doc = CodebookDoc.model_validate(document)
    except ValidationError as exc:
        errors = [
            _err([*loc_prefix, *e["loc"]], e["type"], e["msg"]) for e in exc.errors(include_url=False)
        ]
        raise Invalid(f"the codebook has {len(errors)} problem(s)", errors=errors) from None
    problems = [*_control_characters(document, []), *check_document(doc)]
    if problems:
        for p in problems:
            p["loc"] = [*loc_prefix, *p["loc"]]
        raise Invalid(f"the codebook has {len(problems)} problem(s)", errors=problems)
    return compile_codebook(document, doc)


def compile_codebook(document: dict[str, Any], doc: CodebookDoc) -> Codebook:
    items: dict[str, Item] = {}
    for inst in doc.instruments:
        for it in inst.items:
            items[it.code] = Item(
                code=it.code, type=it.type, instrument=inst.key, required=it.required,
                waves=frozenset(it.waves), options=frozenset(o.code for o in it.options or []),
                min=it.min, max=it.max, max_length=it.max_length, enable_when=it.enable_when,
            )
    available = {code: item.type for code, item in items.items()}
    derived = []
    for d in doc.derived:
        derived.append(compile_derived(d.code, d.type, d.definition, available, expression=d.expression))
        available[d.code] = d.type
    wave_keys = tuple(w.key for w in doc.waves)
    by_wave = {w: tuple(it for it in items.values() if w in it.waves) for w in wave_keys}
    return Codebook(
        document=document, items=items, wave_keys=wave_keys, rules=tuple(doc.rules),
        derived=tuple(derived), items_by_wave=by_wave,
    )


def template_document(template: str) -> dict[str, Any]:
    filename = TEMPLATES[template]
    text = resources.files("app.instruments").joinpath("codebooks", filename).read_text(encoding="utf-8")
    document: dict[str, Any] = json.loads(text)
    return document


_compiled_cache: dict[str, Codebook] = {}


def load_codebook(document: dict[str, Any]) -> Codebook:
    """Compile a stored (already validated) document, cached by content hash."""
    digest = document_sha256(document)
    cached = _compiled_cache.get(digest)
    if cached is None:
        cached = parse_codebook(document)
        _compiled_cache[digest] = cached
    return cached
