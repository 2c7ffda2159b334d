"""De-identified exports: values as stored, pseudonyms instead of ids, no contact data."""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pandas as pd
import pytest

from app.core.crypto import settings_sealer
from app.core.db import Database, transaction
from app.core.settings import Settings
from app.studies.service import pseudonymiser, system_context
from tests.conftest import ADMIN_TOKEN
from tests.factories import auth, create_study, create_token, pal_codebook, valid_answers

pytestmark = pytest.mark.anyio

BASE = "/api/v1/studies/pal"
DOC = pal_codebook()
ITEMS = [it for inst in DOC["instruments"] for it in inst["items"]]
DERIVED = [d["code"] for d in DOC["derived"]]


def as_export_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ";".join(value)
    return str(value)


@pytest.fixture
async def data(admin: httpx.AsyncClient) -> dict[str, Any]:
    await create_study(admin, ADMIN_TOKEN, key="pal")
    rng = random.Random(7)
    sent: dict[tuple[str, str], dict[str, Any]] = {}
    for i in range(12):
        ext = f"E{i:02d}"
        await admin.post(f"{BASE}/participants", json={
            "external_id": ext, "enrolled_at": (datetime.now(UTC) - timedelta(days=400)).isoformat(),
            "contact": {"email": f"{ext.lower()}@example.org", "name": f"Secret Name {i}"}})
        for wave in ("baseline", "month6", "month12"):
            if wave != "baseline" and rng.random() < 0.3:
                continue
            answers = valid_answers(wave, rng)
            r = await admin.post(f"{BASE}/responses", json={"external_id": ext, "wave": wave, "answers": answers})
            assert r.status_code == 201
            sent[(ext, wave)] = {**answers, **r.json()["derived"]}
    analyst = await create_token(admin, ADMIN_TOKEN, "analyst")
    return {"sent": sent, "analyst": analyst}


def pseudonyms(database: Database, settings: Settings) -> dict[str, str]:
    with transaction(database) as session:
        ctx = system_context(session, "pal")
        name = pseudonymiser(session, ctx.study, settings_sealer(settings))
    return {f"E{i:02d}": name(f"E{i:02d}") for i in range(12)}


async def get(client: httpx.AsyncClient, token: str, **params: Any) -> httpx.Response:
    r = await client.get(f"{BASE}/export", params=params, headers=auth(token))
    assert r.status_code == 200, r.text
    return r


async def test_long_csv_holds_every_value_under_a_pseudonym(app_client: httpx.AsyncClient, data: dict[str, Any],
                                                            database: Database, settings: Settings) -> None:
    r = await get(app_client, data["analyst"], format="csv", layout="long")
    assert r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert len(rows) == len(data["sent"])
    names = pseudonyms(database, settings)
    by_name = {v: k for k, v in names.items()}
    assert list(rows[0])[:4] == ["participant", "wave", "completed_at", "late"]
    assert list(rows[0])[4:] == [it["code"] for it in ITEMS] + DERIVED
    assert {row["late"] for row in rows} <= {"true", "false"}  # one spelling of booleans everywhere
    for row in rows:
        ext = by_name[row["participant"]]
        expected = data["sent"][(ext, row["wave"])]
        for code in [it["code"] for it in ITEMS] + DERIVED:
            assert row[code] == as_export_text(expected.get(code)), (ext, row["wave"], code)
    assert "E0" not in r.text and "@example.org" not in r.text and "Secret Name" not in r.text


async def test_pseudonyms_are_hmac_sha256_of_the_external_id(app_client: httpx.AsyncClient, data: dict[str, Any],
                                                             database: Database, settings: Settings) -> None:
    with transaction(database) as session:
        ctx = system_context(session, "pal")
        key = pseudonymiser(session, ctx.study, settings_sealer(settings)).key
    expected = {hmac.new(key, f"E{i:02d}".encode(), hashlib.sha256).hexdigest()[:16] for i in range(12)}
    rows = list(csv.DictReader(io.StringIO((await get(app_client, data["analyst"], layout="wide")).text)))
    assert {row["participant"] for row in rows} == expected  # SQL's HMAC equals Python's
    # the same pseudonym the analyst sees on responses
    response = (await app_client.get(f"{BASE}/responses", params={"limit": 1},
                                     headers=auth(data["analyst"]))).json()["items"][0]
    assert response["pseudonym"] in expected and response["external_id"] is None


async def test_wide_layout_has_one_row_per_participant(app_client: httpx.AsyncClient, data: dict[str, Any],
                                                       database: Database, settings: Settings) -> None:
    rows = list(csv.DictReader(io.StringIO((await get(app_client, data["analyst"], layout="wide")).text)))
    assert len(rows) == 12
    names = {v: k for k, v in pseudonyms(database, settings).items()}
    header = list(rows[0])
    assert "gender_baseline" in header and "gender_month6" not in header and "alcohol_last_use_month12" in header
    for row in rows:
        ext = names[row["participant"]]
        for wave in ("baseline", "month6", "month12"):
            expected = data["sent"].get((ext, wave))
            assert row[f"alcohol_last_use_{wave}"] == (expected["alcohol_last_use"] if expected else "")
            assert row[f"abstinent_30d_{wave}"] == (as_export_text(expected["abstinent_30d"]) if expected else "")


async def test_parquet_has_typed_columns(app_client: httpx.AsyncClient, data: dict[str, Any],
                                         database: Database, settings: Settings) -> None:
    r = await get(app_client, data["analyst"], format="parquet", layout="long")
    assert r.headers["content-type"] == "application/vnd.apache.parquet"
    frame = pd.read_parquet(io.BytesIO(r.content))
    assert len(frame) == len(data["sent"])
    assert str(frame["age"].dtype) == "float64" or str(frame["age"].dtype).startswith("int")
    assert frame["hispanic"].dropna().isin([True, False]).all()
    assert str(frame["self_efficacy_score"].dtype) == "float64"
    names = {v: k for k, v in pseudonyms(database, settings).items()}
    for _, row in frame[frame["wave"] == "baseline"].iterrows():
        expected = data["sent"][(names[row["participant"]], "baseline")]
        assert int(row["age"]) == expected["age"] and bool(row["abstinent_30d"]) == expected["abstinent_30d"]
    wide = pd.read_parquet(io.BytesIO((await get(app_client, data["analyst"], format="parquet",
                                                  layout="wide")).content))
    assert len(wide) == 12 and "age_baseline" in wide.columns
    # what pandas, R arrow and DuckDB read: typed columns, not text
    import pyarrow.parquet as pq

    schema = pq.read_schema(io.BytesIO(r.content))
    assert str(schema.field("completed_at").type) == "timestamp[us, tz=UTC]"
    assert str(schema.field("age").type) == "int64" and str(schema.field("late").type) == "bool"
    assert str(schema.field("gender").type) == "dictionary<values=string, indices=int32, ordered=0>"
    assert str(frame["completed_at"].dtype) == "datetime64[us, UTC]"


async def test_data_dictionary_and_roles(app_client: httpx.AsyncClient, admin: httpx.AsyncClient,
                                         data: dict[str, Any]) -> None:
    r = await app_client.get(f"{BASE}/export/dictionary", headers=auth(data["analyst"]))
    assert r.status_code == 200
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert [row["variable"] for row in rows] == [it["code"] for it in ITEMS] + DERIVED
    gender = next(row for row in rows if row["variable"] == "gender")
    assert gender["options"].startswith("woman=Woman | man=Man") and gender["waves"] == "baseline"
    home = next(row for row in rows if row["variable"] == "home_group")
    assert home["enable_when"] == "primary_group not_in ['none']"
    for role in ("coordinator", "collector"):
        token = await create_token(admin, ADMIN_TOKEN, role)
        assert (await app_client.get(f"{BASE}/export", headers=auth(token))).status_code == 403
    assert (await app_client.get(f"{BASE}/export", params={"format": "xlsx"},
                                 headers=auth(data["analyst"]))).status_code == 422


async def test_an_empty_study_exports_a_header(admin: httpx.AsyncClient) -> None:
    await create_study(admin, ADMIN_TOKEN, key="pal")
    r = await admin.get(f"{BASE}/export")
    assert r.status_code == 200 and r.text.startswith("participant,wave,completed_at,late,gender")
    assert r.text.count("\n") == 1
