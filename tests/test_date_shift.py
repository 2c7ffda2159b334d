"""Date-shifted and year-only de-identified exports: intervals exact, shifts stable and per participant."""

from __future__ import annotations

import csv
import io
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
import pandas as pd
import pytest

from tests.conftest import ADMIN_TOKEN
from tests.factories import auth, create_token, minimal_codebook

pytestmark = pytest.mark.anyio

NOW = datetime.now(UTC).replace(microsecond=0)
# item dates years apart, so that no shift (at most 180 days) can land on another participant's date
PEOPLE = {f"D{i}": date(2016 + 3 * i, 3, 10) for i in range(4)}


def codebook() -> dict[str, Any]:
    document = minimal_codebook()
    document["instruments"][0]["items"].append(
        {"code": "last_drink", "type": "date", "label": "Last drink", "required": False, "waves": ["intake", "week4"]})
    return document


@pytest.fixture
async def study(admin: httpx.AsyncClient) -> dict[str, Any]:
    key = "shifty"
    r = await admin.post("/api/v1/studies", json={"key": key, "name": "Shifty", "timezone": "UTC",
                                                  "codebook": codebook()})
    assert r.status_code == 201, r.text
    originals: dict[str, dict[str, tuple[str, str]]] = {}
    for n, (external_id, day) in enumerate(PEOPLE.items()):
        enrolled = NOW - timedelta(days=40, hours=n)
        assert (await admin.post(f"/api/v1/studies/{key}/participants", json={
            "external_id": external_id, "enrolled_at": enrolled.isoformat()})).status_code == 201
        originals[external_id] = {}
        for wave, offset, gap in (("intake", 1, 0), ("week4", 29, 17)):
            completed = enrolled + timedelta(days=offset, minutes=7 * n)
            answer = (day + timedelta(days=gap)).isoformat()
            r = await admin.post(f"/api/v1/studies/{key}/responses", json={
                "external_id": external_id, "wave": wave, "status": "complete",
                "completed_at": completed.isoformat(), "answers": {
                    "drinks_week": 3, "smoker": False, "last_drink": answer}})
            assert r.status_code == 201, r.text
            originals[external_id][wave] = (completed.strftime("%Y-%m-%dT%H:%M:%SZ"), answer)
    return {"key": key, "originals": originals,
            "analyst": await create_token(admin, ADMIN_TOKEN, "analyst"),
            "coordinator": await create_token(admin, ADMIN_TOKEN, "coordinator")}


async def rows(client: httpx.AsyncClient, study: dict[str, Any], **params: str) -> list[dict[str, str]]:
    r = await client.get(f"/api/v1/studies/{study['key']}/export", params=params, headers=auth(study["analyst"]))
    assert r.status_code == 200, r.text
    return list(csv.DictReader(io.StringIO(r.text)))


def by_participant(exported: list[dict[str, str]]) -> dict[tuple[str, str], dict[str, str]]:
    return {(row["participant"], row["wave"]): row for row in exported}


async def test_shifted_dates_keep_intervals_and_hide_every_original(app_client: httpx.AsyncClient,
                                                                    study: dict[str, Any]) -> None:
    exact = by_participant(await rows(app_client, study))
    shifted_csv = await app_client.get(f"/api/v1/studies/{study['key']}/export", params={"dates": "shifted"},
                                       headers=auth(study["analyst"]))
    shifted = by_participant(list(csv.DictReader(io.StringIO(shifted_csv.text))))
    assert exact.keys() == shifted.keys() and len(exact) == 8
    # pseudonym -> external id, through the exact export's own values
    names = {pseudonym: ext for ext, waves in study["originals"].items() for (pseudonym, wave), row in exact.items()
             if row["last_drink"] == waves[wave][1]}
    assert len(names) == 4
    shifts = {}
    for pseudonym, ext in names.items():
        days = set()
        for wave in ("intake", "week4"):
            before, after = exact[(pseudonym, wave)], shifted[(pseudonym, wave)]
            moved = datetime.fromisoformat(after["completed_at"]) - datetime.fromisoformat(before["completed_at"])
            assert moved == timedelta(days=moved.days), "a whole number of days"
            item = date.fromisoformat(after["last_drink"]) - date.fromisoformat(before["last_drink"])
            days |= {moved.days, item.days}
            # nothing else changes
            assert {k: v for k, v in after.items() if k not in ("completed_at", "last_drink")} == \
                   {k: v for k, v in before.items() if k not in ("completed_at", "last_drink")}
        assert len(days) == 1, "one shift per participant, for every date and timestamp"
        shifts[ext] = days.pop()
        assert shifts[ext] != 0 and -180 <= shifts[ext] <= 180
        # the coordinator can undo it: the same number, from the API
        undo = await app_client.get(f"/api/v1/studies/{study['key']}/participants/{ext}/date-shift",
                                    headers=auth(study["coordinator"]))
        assert undo.status_code == 200 and undo.json()["days"] == shifts[ext]
    assert len(set(shifts.values())) > 1, "shifts differ between participants"
    # no row carries its own original dates, nor another participant's (their dates are years apart). A
    # participant's two waves are 28 days apart (items 17), so a shift of that many days can land one
    # wave on the other's original date by chance: that is a coincidence of the shift, not a leak.
    for (pseudonym, wave), row in shifted.items():
        ext = names[pseudonym]
        completed, answer = study["originals"][ext][wave]
        assert row["completed_at"][:10] != completed[:10] and row["last_drink"] != answer
        others = {a for other, waves in study["originals"].items() if other != ext for _, a in waves.values()}
        assert row["last_drink"] not in others
    # the same export again, the wide layout and Parquet all carry the same shifts
    assert by_participant(await rows(app_client, study, dates="shifted")) == shifted
    wide = {r["participant"]: r for r in await rows(app_client, study, dates="shifted", layout="wide")}
    for (pseudonym, wave), row in shifted.items():
        assert wide[pseudonym][f"last_drink_{wave}"] == row["last_drink"]
    r = await app_client.get(f"/api/v1/studies/{study['key']}/export", headers=auth(study["analyst"]),
                             params={"dates": "shifted", "format": "parquet"})
    frame = pd.read_parquet(io.BytesIO(r.content))
    for record in frame.to_dict("records"):
        row = shifted[(record["participant"], record["wave"])]
        assert record["completed_at"].strftime("%Y-%m-%dT%H:%M:%SZ") == row["completed_at"]
        assert record["last_drink"].isoformat() == row["last_drink"]


async def test_year_only_exports_and_the_dictionary_says_which(admin: httpx.AsyncClient,
                                                               app_client: httpx.AsyncClient,
                                                               study: dict[str, Any]) -> None:
    years = by_participant(await rows(app_client, study, dates="year"))
    exact = by_participant(await rows(app_client, study))
    for key, row in years.items():
        assert row["completed_at"] == exact[key]["completed_at"][:4]
        assert row["last_drink"] == exact[key]["last_drink"][:4]
    frame = pd.read_parquet(io.BytesIO((await app_client.get(
        f"/api/v1/studies/{study['key']}/export", headers=auth(study["analyst"]),
        params={"dates": "year", "format": "parquet"})).content))
    assert set(frame["completed_at"]) == {int(r["completed_at"]) for r in years.values()}
    base = f"/api/v1/studies/{study['key']}/export/dictionary"
    plain = (await app_client.get(base, headers=auth(study["analyst"]))).text
    assert "shifted" not in plain and "completed_at" not in plain
    for dates, words in (("shifted", "shifted by a per-participant number of days"), ("year", "their year")):
        dictionary = list(csv.DictReader(io.StringIO((await app_client.get(
            base, params={"dates": dates}, headers=auth(study["analyst"]))).text)))
        notes = {row["variable"]: row["definition"] for row in dictionary}
        assert words in notes["completed_at"] and words in notes["last_drink"], dates
    # a study's default: shifted, unless the request says otherwise
    r = await admin.patch(f"/api/v1/studies/{study['key']}", json={"export_dates": "shifted"})
    assert r.status_code == 200 and r.json()["export_dates"] == "shifted"
    assert by_participant(await rows(app_client, study)) == by_participant(await rows(app_client, study,
                                                                                     dates="shifted"))
    assert by_participant(await rows(app_client, study, dates="exact")) == exact


async def test_the_dashboard_offers_the_shifted_export(app: Any, app_client: httpx.AsyncClient,
                                                       study: dict[str, Any]) -> None:
    from tests.conftest import client_for

    async with client_for(app) as browser:
        assert (await browser.post("/ui/login", data={"token": study["analyst"]})).status_code == 303
        page = await browser.get(f"/ui/studies/{study['key']}/data")
        assert page.status_code == 200 and "dates=shifted" in page.text
        shifted = await browser.get(f"/ui/studies/{study['key']}/export", params={"dates": "shifted"})
        assert shifted.status_code == 200
    api = by_participant(await rows(app_client, study, dates="shifted"))
    assert by_participant(list(csv.DictReader(io.StringIO(shifted.text)))) == api
