"""Derived variables: small expressions over item codes, evaluated with SQL-style nulls.

A definition such as ``alcohol_last_use != 'within_30d' and drug_last_use != 'within_30d'``
or ``mean(cohesion_1..cohesion_6)`` is parsed once with Python's `ast` into a whitelisted
tree (no attribute access, no calls but the few functions below) and evaluated against a
response's answers. A missing input makes the result null rather than a guess.

A definition written as prose for readers ("count of true aud_1..aud_11 (baseline)") carries
its expression beside it (`expression`: ``count(aud_1..aud_11)``); that is what is evaluated.
No derived variable is computed by code that knows its name. A value asked at one wave only
(aud_severity) is carried to later waves from the participant's response at that wave.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


class DefinitionError(ValueError):
    pass


Evaluator = Callable[[Mapping[str, Any]], Any]


@dataclass(frozen=True)
class DerivedVariable:
    code: str
    type: str
    definition: str
    inputs: frozenset[str]
    evaluate: Evaluator
    expression: str | None = None

    def value(self, env: Mapping[str, Any]) -> Any:
        return _cast(self.type, self.evaluate(env))


_RANGE = re.compile(r"\b([a-z][a-z0-9_]*?_?)(\d+)\.\.([a-z][a-z0-9_]*?_?)(\d+)\b")


def expand_ranges(definition: str) -> str:
    """Rewrite ``se_1..se_12`` as the list ``[se_1, se_2, ..., se_12]``."""

    def repl(m: re.Match[str]) -> str:
        prefix, start, prefix2, stop = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
        if prefix != prefix2 or stop < start or stop - start > 200:
            raise DefinitionError(f"bad range {m.group(0)!r}")
        return "[" + ", ".join(f"{prefix}{i}" for i in range(start, stop + 1)) + "]"

    return _RANGE.sub(repl, definition)


def _all_known(values: Sequence[Any]) -> bool:
    return all(v is not None for v in values)


def _mean(values: Any) -> Any:
    if values is None or not _all_known(values) or len(values) == 0:
        return None
    return sum(values) / len(values)


def _sum(values: Any) -> Any:
    if values is None or not _all_known(values):
        return None
    return sum(values)


def _count_true(values: Any) -> Any:
    if values is None or not _all_known(values):
        return None
    return sum(1 for v in values if v is True)


def _len(value: Any) -> Any:
    return None if value is None else len(value)


FUNCTIONS: dict[str, Callable[[Any], Any]] = {
    "len": _len,
    "mean": _mean,
    "sum": _sum,
    "count": _count_true,
    "count_true": _count_true,
}

_COMPARE: dict[type[ast.cmpop], Callable[[Any, Any], bool]] = {
    ast.Eq: lambda a, b: bool(a == b),
    ast.NotEq: lambda a, b: bool(a != b),
    ast.Lt: lambda a, b: bool(a < b),
    ast.LtE: lambda a, b: bool(a <= b),
    ast.Gt: lambda a, b: bool(a > b),
    ast.GtE: lambda a, b: bool(a >= b),
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
}

_ARITH: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b if b != 0 else None,
}


def _compile_node(node: ast.AST, known: Mapping[str, str], inputs: set[str]) -> Evaluator:
    """Turn a whitelisted AST node into a closure; anything else is a DefinitionError."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str | int | float | bool):
        const = node.value
        return lambda env: const
    if isinstance(node, ast.Name):
        if node.id not in known:
            raise DefinitionError(f"unknown item {node.id!r}")
        name = node.id
        inputs.add(name)
        return lambda env: env.get(name)
    if isinstance(node, ast.List | ast.Tuple):
        parts = [_compile_node(e, known, inputs) for e in node.elts]
        return lambda env: [p(env) for p in parts]
    if isinstance(node, ast.BoolOp):
        parts = [_compile_node(v, known, inputs) for v in node.values]
        if isinstance(node.op, ast.And):
            return lambda env: _and([p(env) for p in parts])
        return lambda env: _or([p(env) for p in parts])
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not | ast.USub):
        inner = _compile_node(node.operand, known, inputs)
        if isinstance(node.op, ast.Not):
            return lambda env: None if (v := inner(env)) is None else not v
        return lambda env: None if (v := inner(env)) is None else -v
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITH:
        op = _ARITH[type(node.op)]
        left, right = _compile_node(node.left, known, inputs), _compile_node(node.right, known, inputs)
        return lambda env: _null_safe(op, left(env), right(env))
    if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _COMPARE:
        cmp = _COMPARE[type(node.ops[0])]
        left = _compile_node(node.left, known, inputs)
        right = _compile_node(node.comparators[0], known, inputs)
        return lambda env: _null_safe(cmp, left(env), right(env))
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in FUNCTIONS
        and len(node.args) == 1
        and not node.keywords
    ):
        fn = FUNCTIONS[node.func.id]
        arg = _compile_node(node.args[0], known, inputs)
        return lambda env: fn(arg(env))
    raise DefinitionError(f"unsupported expression: {ast.dump(node)[:80]}")


def _null_safe(op: Callable[[Any, Any], Any], a: Any, b: Any) -> Any:
    if a is None or b is None:
        return None
    try:
        return op(a, b)
    except TypeError:
        return None


def _and(values: list[Any]) -> bool | None:
    if any(v is not None and not v for v in values):
        return False
    return None if any(v is None for v in values) else True


def _or(values: list[Any]) -> bool | None:
    if any(v is not None and v for v in values):
        return True
    return None if any(v is None for v in values) else False


def _cast(type_: str, value: Any) -> Any:
    if value is None:
        return None
    if type_ == "boolean":
        return bool(value)
    if type_ == "integer":
        return int(value)
    if type_ == "number":
        return float(value)
    return str(value)


def compile_derived(code: str, type_: str, definition: str, known: Mapping[str, str], *,
                    expression: str | None = None) -> DerivedVariable:
    """Compile one definition against the codes available so far (items, then earlier derived).

    `expression`, when given, is evaluated and `definition` is the readers' text beside it;
    no variable is computed by code that knows its name."""
    source = expression if expression is not None else definition
    try:
        tree = ast.parse(expand_ranges(source), mode="eval")
    except SyntaxError:
        raise DefinitionError(
            "not an expression the service can evaluate (use item codes, comparisons, and/or/not, + - * /, "
            "len/mean/sum/count and ranges like x_1..x_6; put prose in `definition` and the expression "
            "in `expression`)"
        ) from None
    inputs: set[str] = set()
    evaluate = _compile_node(tree.body, known, inputs)
    return DerivedVariable(code, type_, definition, frozenset(inputs), evaluate, expression)
