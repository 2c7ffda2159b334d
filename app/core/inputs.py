"""Checks on raw client input that hold for every route: no NUL characters, no absurdly deep JSON.

PostgreSQL refuses NUL in text, and Python's JSON parser recurses once per nesting level, so
either one would surface deep inside a handler as a server error. They are refused at the edge
instead (see `InputGuard` in `app.core.middleware`), naming where the bad value was.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl

MAX_JSON_DEPTH = 64

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(rb"[\[\]{}]")
# A \u0000 escape is one whose backslash is not itself escaped: an even run of backslashes before it.
_NUL_ESCAPE = re.compile(rb'(?<!\\)(?:\\\\)*\\u0000')


def json_depth(raw: bytes) -> int:
    """The deepest nesting of arrays and objects, without parsing (strings are skipped)."""
    depth = deepest = 0
    for bracket in _BRACKET.findall(_STRING.sub(b'""', raw)):
        if bracket in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def parsed_depth(value: Any) -> int:
    """How deeply arrays and objects nest in already parsed JSON (iterative: no recursion limit
    to hit), counted no further than one level past MAX_JSON_DEPTH."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, level)
            if level <= MAX_JSON_DEPTH:
                stack.extend((v, level + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def _nul_paths(value: Any, loc: list[str | int]) -> Iterator[list[str | int]]:
    if isinstance(value, str):
        if "\x00" in value:
            yield loc
    elif isinstance(value, dict):
        for key, item in value.items():
            if "\x00" in key:
                yield [*loc, key.replace("\x00", "\\u0000")]
            yield from _nul_paths(item, [*loc, key])
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _nul_paths(item, [*loc, i])


def json_problems(raw: bytes, loc: list[str | int] | None = None) -> list[dict[str, Any]]:
    """Field errors for a JSON body: too deep, or strings holding NUL. Empty when it is fine
    (or not JSON at all: the route's own parser reports that)."""
    base = loc or []
    # JSON between systems is UTF-8 (RFC 8259), where no NUL byte can stand: a body with one is UTF-16 or
    # UTF-32 (which Python's parser would read, NUL escapes and all, past the search below) or not JSON
    if b"\x00" in raw:
        return [{"loc": base, "code": "encoding", "message": "JSON must be UTF-8 text, without NUL bytes"}]
    # Nesting needs an opening bracket per level: with no more of them than the limit anywhere in
    # the body (most bodies), the scan that skips strings cannot find it too deep, and is not run.
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and json_depth(raw) > MAX_JSON_DEPTH:
        return [{"loc": base, "code": "too_deep",
                 "message": f"JSON is nested more than {MAX_JSON_DEPTH} levels deep"}]
    # the plain search first: the pattern alone tries every position of the body, most have no escape at all
    if b"\\u0000" not in raw or not _NUL_ESCAPE.search(raw):
        return []
    try:
        document = json.loads(raw)
    except ValueError:
        return []
    return [nul_error(path) for path in _nul_paths(document, list(base))]


def nul_error(loc: list[str | int]) -> dict[str, Any]:
    return {"loc": loc, "code": "nul_character", "message": "text may not contain the NUL character (U+0000)"}


def _urlencoded_problems(raw: bytes, prefix: list[str | int], json_fields: bool) -> list[dict[str, Any]]:
    errors: list[dict[str, Any]] = []
    for name, value in parse_qsl(raw.decode("latin-1"), keep_blank_values=True):
        if "\x00" in name or "\x00" in value:
            errors.append(nul_error([*prefix, name.replace("\x00", "\\u0000")]))
        elif json_fields and value[:1] in ("[", "{"):
            errors.extend(json_problems(value.encode("latin-1"), [*prefix, name]))
    return errors


def form_problems(raw: bytes) -> list[dict[str, Any]]:
    """Field errors of an application/x-www-form-urlencoded body (NUL, or deep JSON in a field)."""
    return _urlencoded_problems(raw, [], json_fields=True)


def query_problems(query_string: bytes) -> list[dict[str, Any]]:
    return _urlencoded_problems(query_string, ["query"], json_fields=False)
