"""Declare the RFC 9457 error responses in the OpenAPI document, as the service really sends them.

FastAPI documents a 422 with its own validation body; this service answers every error with
application/problem+json, so the generated document is rewritten to say so, per operation.
"""

from __future__ import annotations

from typing import Any

PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "description": "RFC 9457 problem details",
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "instance": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["loc", "code", "message"],
                "properties": {
                    "loc": {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
                    "code": {"type": "string"},
                    "message": {"type": "string"},
                },
            },
        },
    },
}

DESCRIPTIONS = {
    "400": "malformed request (not JSON, bad cursor)",
    "401": "missing, unknown or revoked token",
    "403": "the token's role (or study) does not allow this",
    "404": "unknown resource",
    "405": "method not allowed",
    "409": "conflict (duplicate, already complete, key in flight)",
    "413": "body too large",
    "415": "unsupported media type",
    "422": "invalid payload; `errors` names each field",
    "429": "rate limited; see Retry-After",
    "503": "database or broker unavailable; retry",
}


def _problem(code: str) -> dict[str, Any]:
    return {"description": DESCRIPTIONS[code],
            "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}


def document_problems(document: dict[str, Any]) -> dict[str, Any]:
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas["Problem"] = PROBLEM_SCHEMA
    for path, operations in document.get("paths", {}).items():
        for method, op in operations.items():
            codes = {"405", "503"}
            if path.startswith("/api/"):
                codes |= {"401", "403", "404", "400", "422"}
            if "{" in path:
                codes |= {"404", "422"}
            if op.get("parameters"):
                codes |= {"400", "422"}
            if method in ("post", "put", "patch", "delete"):
                codes |= {"409", "429"}
            if "requestBody" in op:
                codes |= {"400", "413", "415", "422"}
            responses = op.setdefault("responses", {})
            for code in sorted(codes):
                responses[code] = _problem(code)
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    return document
