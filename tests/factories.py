"""Plain factory functions per domain, going through the API as a client would."""

from __future__ import annotations

import copy
import json
import uuid
from pathlib import Path
from typing import Any

import httpx

SHIPPED_CODEBOOK = Path(__file__).resolve().parents[1] / "app" / "instruments" / "codebooks" / "pal-v1.json"


def auth(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def pal_codebook() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(SHIPPED_CODEBOOK.read_text())
    return copy.deepcopy(document)


def unique_key(prefix: str = "study") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def create_study(client: httpx.AsyncClient, token: str, *, key: str | None = None,
                       timezone: str = "America/New_York", **extra: Any) -> dict[str, Any]:
    body = {"key": key or unique_key(), "name": "PAL replication", "timezone": timezone,
            "template": "pal-replication", **extra}
    r = await client.post("/api/v1/studies", json=body, headers=auth(token))
    assert r.status_code == 201, r.text
    created: dict[str, Any] = r.json()
    return created


async def create_token(client: httpx.AsyncClient, admin_token: str, role: str,
                       study_key: str | None = None) -> str:
    body: dict[str, Any] = {"role": role, "label": f"test {role}"}
    if study_key:
        body["study_key"] = study_key
    r = await client.post("/api/v1/tokens", json=body, headers=auth(admin_token))
    assert r.status_code == 201, r.text
    return str(r.json()["token"])


def minimal_codebook(**overrides: Any) -> dict[str, Any]:
    """A small valid codebook in the pal-v1 format, for upload tests."""
    document: dict[str, Any] = {
        "key": "mini",
        "version": 1,
        "title": "Mini study",
        "waves": [
            {"key": "intake", "label": "Intake", "offset_days": 0, "window_open_days": 0, "window_close_days": 14},
            {"key": "week4", "label": "Week 4", "offset_days": 28, "window_open_days": 21, "window_close_days": 35},
        ],
        "reminder_policy": {"invite_on_open": True, "reminder_days_after_open": [3],
                            "final_days_before_close": 2, "channel": "email"},
        "instruments": [
            {
                "key": "core",
                "label": "Core",
                "waves": ["intake", "week4"],
                "items": [
                    {"code": "drinks_week", "type": "integer", "label": "Drinks last week", "min": 0, "max": 200,
                     "required": True, "waves": ["intake", "week4"]},
                    {"code": "smoker", "type": "boolean", "label": "Smokes", "required": True,
                     "waves": ["intake", "week4"]},
                    {"code": "cigs_day", "type": "number", "label": "Cigarettes a day", "min": 0, "max": 100,
                     "required": True, "waves": ["intake", "week4"],
                     "enable_when": {"item": "smoker", "operator": "==", "value": True}},
                    {"code": "mood", "type": "single_choice", "label": "Mood", "required": False,
                     "waves": ["intake"], "options": [{"code": "good", "label": "Good"},
                                                      {"code": "bad", "label": "Bad"}]},
                ],
            }
        ],
        "rules": [],
        "derived": [{"code": "heavy", "type": "boolean", "definition": "drinks_week >= 14"}],
    }
    document.update(overrides)
    return document


def items_at(codebook: dict[str, Any], wave: str) -> list[dict[str, Any]]:
    return [it for inst in codebook["instruments"] for it in inst["items"] if wave in it["waves"]]


def condition_met(item: dict[str, Any], answers: dict[str, Any]) -> bool:
    cond = item.get("enable_when")
    if not cond:
        return True
    value = answers.get(cond["item"])
    if value is None:
        return False
    op, target = cond["operator"], cond["value"]
    if op == "in":
        return value in target
    if op == "not_in":
        return value not in target
    if op == "==":
        return bool(value == target)
    if op == "!=":
        return bool(value != target)
    raise AssertionError(f"operator {op} not handled by the test generator")


def valid_answers(wave: str, rng: Any, codebook: dict[str, Any] | None = None, /, **fixed: Any) -> dict[str, Any]:
    """Answers for every item asked at `wave`, honouring conditions and the codebook's rules."""
    codebook = codebook or pal_codebook()
    answers: dict[str, Any] = {}
    for it in items_at(codebook, wave):
        code = it["code"]
        if code in fixed:
            if fixed[code] is not None:
                answers[code] = fixed[code]
            continue
        if not condition_met(it, answers):
            continue
        t = it["type"]
        if t == "single_choice":
            answers[code] = rng.choice([o["code"] for o in it["options"]])
        elif t == "multi_choice":
            answers[code] = sorted(rng.sample([o["code"] for o in it["options"]], rng.randint(0, 2)))
        elif t == "integer":
            low = it.get("min", 0)
            answers[code] = rng.randint(low, min(it.get("max", low + 20), low + 20))
        elif t == "number":
            answers[code] = round(rng.uniform(it.get("min", 0), it.get("max", 10)), 2)
        elif t == "boolean":
            answers[code] = rng.random() < 0.5
        elif t == "text":
            answers[code] = "free text"
        elif t == "date":
            answers[code] = "2026-01-15"
    for rule in codebook.get("rules", []):
        if rule["left"] in fixed or rule["right"] in fixed:
            continue
        if rule["operator"] == "<=" and rule["left"] in answers and rule["right"] in answers:
            answers[rule["left"]] = min(answers[rule["left"]], answers[rule["right"]])
    return answers


def simulated_pal_study(base_url: str, admin_token: str, settings: Any, n: int, seed: int,
                        name: str = "PAL") -> None:
    """Study `pal` from the template, with a simulated cohort whose windows have all closed
    (written through the service layer, contacts included)."""
    from datetime import UTC, datetime

    from app.analysis.simulate import default_start, generate, write
    from app.core.crypto import settings_sealer
    from app.core.db import Database, transaction
    from app.studies.service import system_context

    r = httpx.post(f"{base_url}/api/v1/studies", headers=auth(admin_token),
                   json={"key": "pal", "name": name, "timezone": "UTC", "template": "pal-replication"})
    assert r.status_code == 201, r.text
    db = Database.from_settings(settings)
    try:
        with transaction(db) as session:
            write(session, system_context(session, "pal"), generate(n, seed, enrolled_from=default_start()),
                  settings_sealer(settings), datetime.now(UTC))
    finally:
        db.dispose()
