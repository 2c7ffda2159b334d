"""REDCap's filter logic, parsed into a small tree and evaluated against a record's rows (never `eval`).

Supported, as REDCap writes it: `[field]`, `[event_name][field]`, checkbox `[field(code)]`,
strings in '' or "", numbers, `=` `==` `<>` `!=` `<` `>` `<=` `>=`, `+ - * /`, `and`/`&&`,
`or`/`||`, `not`, parentheses, `true`/`false`, and the functions `datediff`, `sum`, `if`,
`min`, `max`, `abs`, `round`, `isblankormissingcode`. Values are REDCap's raw export values
(text); a comparison is numeric when both sides are numbers, by date when both are dates
(ISO, so as text), else by text; a blank value is equal only to `''` and never less or greater
than anything. Anything else is a `LogicError` naming the problem, raised while parsing (evaluation never raises),
which the API answers as a 400.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

MAX_LENGTH = 10_000
MAX_DEPTH = 64

Value = str | float | bool
Row = Mapping[str, str]


class LogicError(ValueError):
    pass


@dataclass(frozen=True)
class Token:
    kind: str  # field, string, number, name, op, lparen, rparen, comma
    text: str
    at: int


_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<field>\[[^\[\]]*\])
  | (?P<string>'[^']*'|"[^"]*")
  | (?P<number>\d+(?:\.\d+)?|\.\d+)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op><>|!=|<=|>=|==|&&|\|\||[=<>+\-*/])
  | (?P<lparen>\()
  | (?P<rparen>\))
  | (?P<comma>,)
""", re.VERBOSE)


def tokenize(text: str) -> list[Token]:
    tokens: list[Token] = []
    at = 0
    while at < len(text):
        match = _TOKEN.match(text, at)
        if match is None:
            if text[at] in "'\"":
                raise LogicError(f"unterminated string starting at position {at + 1}")
            raise LogicError(f"unexpected character {text[at]!r} at position {at + 1}")
        kind = match.lastgroup
        assert kind is not None
        if kind != "space":
            tokens.append(Token(kind, match.group(), at))
        at = match.end()
    return tokens


# -- the tree ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Literal:
    value: Value


@dataclass(frozen=True)
class FieldRef:
    event: str | None
    name: str
    code: str | None  # a checkbox option


@dataclass(frozen=True)
class Unary:
    op: str
    operand: Node


@dataclass(frozen=True)
class Binary:
    op: str
    left: Node
    right: Node


@dataclass(frozen=True)
class Call:
    name: str
    args: tuple[Node, ...]


Node = Literal | FieldRef | Unary | Binary | Call

COMPARISONS = {"=": "=", "==": "=", "<>": "<>", "!=": "<>", "<": "<", ">": ">", "<=": "<=", ">=": ">="}
FUNCTIONS: dict[str, tuple[int, int]] = {  # name -> (fewest, most) arguments
    "datediff": (3, 5), "sum": (1, 100), "if": (3, 3), "min": (1, 100), "max": (1, 100), "abs": (1, 1),
    "round": (1, 2), "isblankormissingcode": (1, 1),
}

_UNITS = {"y": 365.2425 * 86400, "M": 30.44 * 86400, "d": 86400, "h": 3600, "m": 60, "s": 1}


class Schema:
    """What names the logic may use: the project's fields, checkbox options and events."""

    def __init__(self, fields: Mapping[str, tuple[str, ...] | None], events: set[str]) -> None:
        self.fields = fields  # name -> checkbox option codes, or None for a field that is not a checkbox
        self.events = events


class _Parser:
    def __init__(self, tokens: list[Token], schema: Schema) -> None:
        self.tokens = tokens
        self.at = 0
        self.schema = schema
        self.depth = 0

    def peek(self) -> Token | None:
        return self.tokens[self.at] if self.at < len(self.tokens) else None

    def take(self) -> Token:
        token = self.peek()
        if token is None:
            raise LogicError("the logic ends too early")
        self.at += 1
        return token

    def expect(self, kind: str, what: str) -> Token:
        if self.peek() is None:
            raise LogicError(f"expected {what}, but the logic ends")
        token = self.take()
        if token.kind != kind:
            raise LogicError(f"expected {what} at position {token.at + 1}, found {token.text!r}")
        return token

    def word(self, *words: str) -> bool:
        token = self.peek()
        if token is not None and ((token.kind == "name" and token.text.lower() in words) or
                                  (token.kind == "op" and token.text in words)):
            self.at += 1
            return True
        return False

    def nested(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise LogicError(f"the logic is nested deeper than {MAX_DEPTH} levels")

    def parse(self) -> Node:
        if not self.tokens:
            raise LogicError("the logic is empty")
        node = self.disjunction()
        extra = self.peek()
        if extra is not None:
            raise LogicError(f"unexpected {extra.text!r} at position {extra.at + 1}")
        return node

    def disjunction(self) -> Node:
        node = self.conjunction()
        while self.word("or", "||"):
            node = Binary("or", node, self.conjunction())
        return node

    def conjunction(self) -> Node:
        node = self.negation()
        while self.word("and", "&&"):
            node = Binary("and", node, self.negation())
        return node

    def negation(self) -> Node:
        if self.word("not"):
            self.nested()
            node: Node = Unary("not", self.negation())
            self.depth -= 1
            return node
        return self.comparison()

    def comparison(self) -> Node:
        node = self.additive()
        token = self.peek()
        if token is not None and token.kind == "op" and token.text in COMPARISONS:
            self.at += 1
            node = Binary(COMPARISONS[token.text], node, self.additive())
            after = self.peek()
            if after is not None and after.kind == "op" and after.text in COMPARISONS:
                raise LogicError(f"comparisons cannot be chained (position {after.at + 1}); join them with and")
        return node

    def additive(self) -> Node:
        node = self.multiplicative()
        while (token := self.peek()) is not None and token.kind == "op" and token.text in "+-":
            self.at += 1
            node = Binary(token.text, node, self.multiplicative())
        return node

    def multiplicative(self) -> Node:
        node = self.unary()
        while (token := self.peek()) is not None and token.kind == "op" and token.text in "*/":
            self.at += 1
            node = Binary(token.text, node, self.unary())
        return node

    def unary(self) -> Node:
        token = self.peek()
        if token is not None and token.kind == "op" and token.text == "-":
            self.at += 1
            self.nested()
            node: Node = Binary("-", Literal(0.0), self.unary())
            self.depth -= 1
            return node
        return self.atom()

    def atom(self) -> Node:
        token = self.take()
        if token.kind == "lparen":
            self.nested()
            node = self.disjunction()
            self.expect("rparen", "')'")
            self.depth -= 1
            return node
        if token.kind == "string":
            return Literal(token.text[1:-1])
        if token.kind == "number":
            return Literal(float(token.text))
        if token.kind == "field":
            return self.field(token)
        if token.kind == "name":
            name = token.text.lower()
            if name in ("true", "false"):
                return Literal(name == "true")
            if name not in FUNCTIONS:
                raise LogicError(f"unknown function or word {token.text!r} at position {token.at + 1} "
                                 f"(functions: {', '.join(sorted(FUNCTIONS))})")
            return self.call(name, token)
        raise LogicError(f"unexpected {token.text!r} at position {token.at + 1}")

    def call(self, name: str, token: Token) -> Node:
        self.expect("lparen", f"'(' after {name}")
        self.nested()
        args: list[Node] = []
        if (nxt := self.peek()) is not None and nxt.kind == "rparen":
            self.at += 1
        else:
            while True:
                args.append(self.disjunction())
                closing = self.take()
                if closing.kind == "rparen":
                    break
                if closing.kind != "comma":
                    raise LogicError(f"expected ',' or ')' at position {closing.at + 1}, found {closing.text!r}")
        self.depth -= 1
        fewest, most = FUNCTIONS[name]
        if not fewest <= len(args) <= most:
            raise LogicError(f"{name} takes {fewest}" + (f" to {most}" if most != fewest else "") +
                             f" arguments, not {len(args)} (position {token.at + 1})")
        if name == "datediff" and isinstance(args[2], Literal) and str(args[2].value) not in _UNITS:
            raise LogicError(f"datediff: unit {args[2].value!r} is not one of y, M, d, h, m, s "
                             f"(position {token.at + 1})")
        return Call(name, tuple(args))

    def field(self, token: Token) -> Node:
        inner = token.text[1:-1].strip()
        event: str | None = None
        nxt = self.peek()
        if nxt is not None and nxt.kind == "field" and nxt.at == token.at + len(token.text):
            event = inner  # [event][field]
            if event not in self.schema.events:
                raise LogicError(f"[{event}] is not an event of this project")
            self.at += 1
            token = nxt
            inner = token.text[1:-1].strip()
        match = re.fullmatch(r"([A-Za-z0-9_]+)(?:\(([^()]*)\))?", inner)
        if match is None:
            raise LogicError(f"{token.text} is not a field reference (position {token.at + 1})")
        name, code = match.group(1), match.group(2)
        if name not in self.schema.fields:
            if name in self.schema.events:
                raise LogicError(f"[{name}] is an event, and must be followed by a [field]")
            raise LogicError(f"[{name}] is not a field of this project")
        options = self.schema.fields[name]
        if code is not None:
            if options is None:
                raise LogicError(f"[{name}({code})]: {name} is not a checkbox field")
            if code not in options:
                raise LogicError(f"[{name}({code})]: {code!r} is not an option of {name}")
        elif options is not None:
            raise LogicError(f"[{name}] is a checkbox: name one option, e.g. [{name}({options[0]})]")
        return FieldRef(event, name, code)


def parse(text: str, schema: Schema) -> Node:
    if len(text) > MAX_LENGTH:
        raise LogicError(f"the logic is longer than {MAX_LENGTH} characters")
    return _Parser(tokenize(text), schema).parse()


# -- evaluation -----------------------------------------------------------------------------------------

Lookup = Callable[[str | None, str], str]  # (event or None for the current one, column) -> raw value


def _number(value: Value) -> float | None:
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, float):
        return value
    try:
        return float(value) if value.strip() != "" else None
    except ValueError:
        return None


_DATE = re.compile(r"\d{4}-\d{2}-\d{2}(?:[ T]\d{2}:\d{2}(?::\d{2})?)?")


def _when(value: Value, today: datetime) -> datetime | None:
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "today":
            return datetime.combine(today.date(), datetime.min.time(), tzinfo=UTC)
        if text == "now":
            return today
        if _DATE.fullmatch(value.strip()):
            try:
                parsed = datetime.fromisoformat(value.strip().replace(" ", "T"))
            except ValueError:
                return None
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


def _blank(value: Value) -> bool:
    return isinstance(value, str) and value.strip() == ""


def _truthy(value: Value) -> bool:
    if isinstance(value, bool):
        return value
    number = _number(value)
    return number is not None and number != 0


def _compare(op: str, left: Value, right: Value) -> bool:
    if _blank(left) or _blank(right):  # blank equals only blank; it is never less or greater
        same = _blank(left) and _blank(right)
        return {"=": same, "<>": not same}.get(op, False)
    a, b = _number(left), _number(right)
    if a is not None and b is not None:
        return _order(op, a, b)
    return _order(op, _text(left), _text(right))  # ISO dates and datetimes order as text


def _order(op: str, x: Any, y: Any) -> bool:
    return bool({"=": x == y, "<>": x != y, "<": x < y, ">": x > y, "<=": x <= y, ">=": x >= y}[op])


def _text(value: Value) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else str(value)
    return value




class Evaluator:
    def __init__(self, lookup: Lookup, today: datetime | None = None) -> None:
        self.lookup = lookup
        self.today = today or datetime.now(UTC)

    def value(self, node: Node) -> Value:
        if isinstance(node, Literal):
            return node.value
        if isinstance(node, FieldRef):
            column = f"{node.name}___{node.code}" if node.code is not None else node.name
            return self.lookup(node.event, column)
        if isinstance(node, Unary):
            return not _truthy(self.value(node.operand))
        if isinstance(node, Binary):
            if node.op == "and":
                return _truthy(self.value(node.left)) and _truthy(self.value(node.right))
            if node.op == "or":
                return _truthy(self.value(node.left)) or _truthy(self.value(node.right))
            left, right = self.value(node.left), self.value(node.right)
            if node.op in ("=", "<>", "<", ">", "<=", ">="):
                return _compare(node.op, left, right)
            a, b = _number(left), _number(right)
            if a is None or b is None:
                return ""  # arithmetic with a blank or text is blank, as in REDCap
            if node.op == "/":
                return a / b if b != 0 else ""
            return {"+": a + b, "-": a - b, "*": a * b}[node.op]
        return self.call(node)

    def call(self, node: Call) -> Value:
        if node.name == "if":
            return self.value(node.args[1] if _truthy(self.value(node.args[0])) else node.args[2])
        args = [self.value(a) for a in node.args]
        if node.name == "isblankormissingcode":
            return _blank(args[0])
        if node.name == "datediff":
            return self.datediff(args)
        numbers = [n for n in (_number(a) for a in args) if n is not None]
        if node.name == "sum":
            return float(sum(numbers))
        if node.name in ("min", "max"):
            return (min if node.name == "min" else max)(numbers) if numbers else ""
        if len(numbers) != len(args):
            return ""
        if node.name == "abs":
            return abs(numbers[0])
        return float(round(numbers[0], int(numbers[1]) if len(numbers) > 1 else 0))  # round

    def datediff(self, args: list[Value]) -> Value:
        unit = str(args[2])
        if unit not in _UNITS:
            return ""  # a unit read from a field; a literal one is checked when parsing
        first, second = _when(args[0], self.today), _when(args[1], self.today)
        if first is None or second is None:
            return ""
        signed = len(args) >= 4 and _truthy(args[-1]) and isinstance(args[-1], bool)
        diff = (second - first).total_seconds() / _UNITS[unit]
        return diff if signed else abs(diff)


def matches(node: Node, lookup: Lookup, today: datetime | None = None) -> bool:
    return _truthy(Evaluator(lookup, today).value(node))
