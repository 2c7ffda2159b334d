"""Answer validation against a codebook, and derived variables; pure functions, no database.

Every item is checked for the wave it is answered at. Types are strict (no "3" for 3, no
1 for true). One problem entry per bad item, located at ["answers", <item code>], with one
of the codes: unknown_item, not_in_wave, type, range, option, required, not_enabled, rule.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Collection, Iterable, Mapping
from datetime import date
from functools import lru_cache
from typing import Any

from app.core.errors import FieldError
from app.instruments.codebook import Codebook, ConditionDoc, Item

Status = str  # "partial" | "complete"

_ORDER: dict[str, Callable[[Any, Any], bool]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq, "!=": operator.ne,
}


def _err(code: str, problem: str, message: str) -> FieldError:
    return {"loc": ["answers", code], "code": problem, "message": message}


def check_value(item: Item, value: Any) -> tuple[str, str] | None:
    """(problem code, message) for a value of the wrong type, range or option; None when fine."""
    t = item.type
    if t == "single_choice":
        if not isinstance(value, str):
            return "type", f"{item.code} takes one option code (a string)"
        if value not in item.options:
            return "option", f"{value!r} is not an option of {item.code}"
        return None
    if t == "multi_choice":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            return "type", f"{item.code} takes a list of option codes"
        unknown = [v for v in value if v not in item.options]
        if unknown:
            return "option", f"{', '.join(map(repr, unknown))} not options of {item.code}"
        if len(set(value)) != len(value):
            return "option", f"{item.code} lists an option twice"
        return None
    if t in ("integer", "number"):
        is_number = isinstance(value, int) or (t == "number" and isinstance(value, float))
        if isinstance(value, bool) or not is_number:
            return "type", f"{item.code} takes {'a whole number' if t == 'integer' else 'a number'}"
        if isinstance(value, float) and not math.isfinite(value):
            return "type", f"{item.code} takes a finite number"
        if (item.min is not None and value < item.min) or (item.max is not None and value > item.max):
            return "range", f"{item.code} must be between {item.min} and {item.max}"
        return None
    if t == "boolean":
        return None if isinstance(value, bool) else ("type", f"{item.code} takes true or false")
    if t == "text":
        if not isinstance(value, str):
            return "type", f"{item.code} takes text"
        if item.max_length is not None and len(value) > item.max_length:
            return "range", f"{item.code} is longer than {item.max_length} characters"
        return None
    if t == "date":
        if not isinstance(value, str) or len(value) != 10:
            return "type", f"{item.code} takes a date as YYYY-MM-DD"
        try:
            date.fromisoformat(value)
        except ValueError:
            return "type", f"{item.code} takes a date as YYYY-MM-DD"
        return None
    return "type", f"{item.code} has an unsupported type {t}"


def condition_holds(cond: ConditionDoc, answers: Mapping[str, Any]) -> bool | None:
    """Whether an item is asked given the answers; None while the controlling item is unanswered."""
    value = answers.get(cond.item)
    if cond.operator == "exists":
        return value is not None
    if value is None:
        return None
    values = value if isinstance(value, list) else [value]
    op = cond.operator
    if op in ("in", "not_in"):
        hit = any(v in cond.value for v in values)
        return hit if op == "in" else not hit
    if op == "==":
        return cond.value in values
    if op == "!=":
        return cond.value not in values
    try:
        return bool(_ORDER[op](value, cond.value))
    except TypeError:
        return None


def instruments_at(codebook: Codebook, wave: str) -> tuple[str, ...]:
    """The instruments asked at `wave` (those with an item asked there), in codebook order."""
    return tuple(dict.fromkeys(item.instrument for item in codebook.items_by_wave.get(wave, ())))


def instrument_states(codebook: Codebook, wave: str, answers: Mapping[str, Any], completed: Iterable[str],
                      status: Status) -> dict[str, str]:
    """complete / partial / not_started for every instrument asked at `wave`."""
    done = set(completed)
    started = {codebook.items[c].instrument for c, v in answers.items() if v is not None and c in codebook.items}
    return {
        inst: "complete" if status == "complete" or inst in done else "partial" if inst in started else "not_started"
        for inst in instruments_at(codebook, wave)
    }


def check_complete_instruments(codebook: Codebook, wave: str, names: Iterable[str]) -> list[FieldError]:
    """Unknown instruments, or instruments not asked at `wave`, named in `complete_instruments`."""
    asked = set(instruments_at(codebook, wave))
    known = {item.instrument for item in codebook.items.values()}
    errors: list[FieldError] = []
    for index, name in enumerate(names):
        if name not in known:
            errors.append({"loc": ["complete_instruments", index], "code": "unknown_instrument",
                           "message": f"{name!r} is not an instrument of this codebook"})
        elif name not in asked:
            errors.append({"loc": ["complete_instruments", index], "code": "not_in_wave",
                           "message": f"instrument {name} is not asked at {wave}"})
    return errors


def check_answers(
    codebook: Codebook, wave: str, incoming: Mapping[str, Any], merged: Mapping[str, Any], status: Status,
    completing: Collection[str] = (),
) -> list[FieldError]:
    """Problems with `incoming` (what this request sends) in the light of `merged` (all answers so far).

    `completing` names instruments recorded complete by this request (with a partial status):
    their required items are checked as a complete response's are, and only theirs.
    """
    errors: list[FieldError] = []
    bad: set[str] = set()

    def flag(code: str, problem: str, message: str) -> None:
        if code not in bad:
            bad.add(code)
            errors.append(_err(code, problem, message))

    for code, value in incoming.items():
        item = codebook.items.get(code)
        if item is None:
            flag(code, "unknown_item", f"{code!r} is not an item of this codebook")
        elif wave not in item.waves:
            flag(code, "not_in_wave", f"{code} is not asked at {wave}")
        elif value is not None:
            problem = check_value(item, value)
            if problem is not None:
                flag(code, *problem)

    complete = status == "complete"

    def completes(item: Item) -> bool:
        return complete or item.instrument in completing

    for code, value in merged.items():
        item = codebook.items.get(code)
        if code in bad or item is None or value is None or item.enable_when is None:
            continue
        state = condition_holds(item.enable_when, merged)
        # For a partial response an unanswered controlling item does not reject the dependent
        # one; the check runs again when the response (or the item's instrument) is completed.
        if state is False or (state is None and completes(item)):
            cond = item.enable_when
            flag(code, "not_enabled", f"{code} is asked only when {cond.item} {cond.operator} {cond.value!r}")

    if complete or completing:
        for item in codebook.items_by_wave.get(wave, ()):
            if not item.required or not completes(item) or merged.get(item.code) is not None or item.code in bad:
                continue
            if item.enable_when is not None and condition_holds(item.enable_when, merged) is not True:
                continue
            flag(item.code, "required", f"{item.code} is required at {wave}")

    for rule in codebook.rules:
        left = merged.get(rule.left)
        right = merged.get(rule.right) if isinstance(rule.right, str) else rule.right
        if left is None or right is None or rule.left in bad or (isinstance(rule.right, str) and rule.right in bad):
            continue
        try:
            holds = _ORDER[rule.operator](left, right)
        except TypeError:
            continue
        if not holds:
            flag(rule.left, "rule", rule.message)
    return errors


# -- derived variables -------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _carried(codebook_sha: str, codebook: Codebook) -> dict[str, tuple[frozenset[str], str | None]]:
    """For each derived variable: the waves where its inputs are asked, and the wave it is carried from."""
    item_inputs: dict[str, frozenset[str]] = {}
    for d in codebook.derived:
        items: set[str] = set()
        for name in d.inputs:
            items |= item_inputs.get(name, {name} if name in codebook.items else set())
        item_inputs[d.code] = frozenset(items)
    out: dict[str, tuple[frozenset[str], str | None]] = {}
    for d in codebook.derived:
        asked = frozenset(w for w in codebook.wave_keys
                          if any(w in codebook.items[c].waves for c in item_inputs[d.code]))
        source = next((w for w in codebook.wave_keys if w in asked), None)
        out[d.code] = (asked, source)
    return out


def carried_from(codebook: Codebook, wave: str) -> dict[str, str]:
    """Derived variables not computable at `wave` (their items are not asked there), with the wave
    whose value they carry: e.g. aud_severity at month6 carries the baseline value."""
    info = _carried(codebook.sha256, codebook)
    return {code: source for code, (asked, source) in info.items() if wave not in asked and source is not None}


def dependent_waves(codebook: Codebook, wave: str) -> tuple[str, ...]:
    """Waves whose derived values carry something from `wave` (and must follow its changes)."""
    return tuple(w for w in codebook.wave_keys if wave in carried_from(codebook, w).values())


def carried_values(codebook: Codebook, wave: str,
                   derived_by_wave: Mapping[str, Mapping[str, Any] | None]) -> dict[str, Any]:
    """The derived values a wave carries from the participant's other waves (baseline aud_severity
    at month6, say), given those waves' derived values: one rule for writes, bulk writes and the
    analysis frame."""
    return {code: (derived_by_wave.get(source) or {}).get(code)
            for code, source in carried_from(codebook, wave).items()}


def compute_derived(
    codebook: Codebook, wave: str, answers: Mapping[str, Any], carried: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    env = dict(answers)
    out: dict[str, Any] = {}
    from_other = carried_from(codebook, wave)
    for d in codebook.derived:
        value = (carried or {}).get(d.code) if d.code in from_other else d.value(env)
        env[d.code] = value
        out[d.code] = value
    return out
