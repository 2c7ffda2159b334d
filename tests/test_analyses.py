"""The contract's models through the API, against statsmodels fitted here on the exported frame,
and against a simulated cohort whose true effects are known."""

from __future__ import annotations

import io
import math
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from scipy import stats as scipy_stats
from sqlalchemy import Connection, text
from statsmodels.genmod.cov_struct import Exchangeable
from statsmodels.genmod.generalized_estimating_equations import GEE

from app.analysis import tasks
from app.analysis.frame import read as read_frame
from app.analysis.simulate import default_start, generate, write
from app.core.crypto import settings_sealer
from app.core.db import Database, transaction
from app.core.settings import Settings
from app.studies.service import pseudonymiser, system_context
from tests.conftest import ADMIN_TOKEN
from tests.factories import auth, create_study, create_token, pal_codebook, valid_answers

pytestmark = pytest.mark.anyio

BASE = "/api/v1/studies/pal"
# the contract's term names and order (section 7, v1.1), written here, not read from the plan
ONLINE_TERMS = ["intercept", "woman", "age", "white", "hispanic", "married", "college", "employed",
                "alcohol_last_use[within_30d]", "alcohol_last_use[30d_to_1y]", "drug_last_use[within_1y]",
                "drug_last_use[1y_to_5y]", "aud_severity", "self_efficacy_score", "multiple_groups", "goal_abstinence",
                "primary_group[aa_12step]", "primary_group[wfs]"]
GEE_TERMS = ["intercept", "online", "wave[month6]", "wave[month12]", "online:wave[month6]", "online:wave[month12]",
             "woman", "age", "aud_severity"]
MODEL2_TERMS = [*GEE_TERMS, "primary_group[aa_12step]", "primary_group[wfs]", "multiple_groups"]
GENERATING_EXTRA = ["primary_group[aa_12step]:wave[month6]", "primary_group[aa_12step]:wave[month12]",
                    "primary_group[wfs]:wave[month6]", "primary_group[wfs]:wave[month12]"]
CONTRASTS = {"online at baseline": ["online"], "online at month6": ["online", "online:wave[month6]"],
             "online at month12": ["online", "online:wave[month12]"]}


def simulate_into(database: Database, settings: Settings, n: int, seed: int) -> dict[str, Any]:
    cohort = generate(n, seed, enrolled_from=default_start())
    with transaction(database) as session:
        write(session, system_context(session, "pal"), cohort, settings_sealer(settings), datetime.now(UTC))
    return cohort.truth


@pytest.fixture
async def analyst(admin: httpx.AsyncClient) -> str:
    await create_study(admin, ADMIN_TOKEN, key="pal")
    return await create_token(admin, ADMIN_TOKEN, "analyst")


async def fit(client: httpx.AsyncClient, token: str, database: Database, settings: Settings,
              body: dict[str, Any], study: str = "pal") -> dict[str, Any]:
    r = await client.post(f"/api/v1/studies/{study}/analyses", json=body, headers=auth(token))
    assert r.status_code == 202, r.text
    assert r.headers["location"] == f"/api/v1/analyses/{r.json()['id']}"
    tasks.run(database, settings, r.json()["id"])  # what the worker does (a real worker: test_workers.py)
    got = await client.get(f"/api/v1/analyses/{r.json()['id']}", headers=auth(token))
    assert got.status_code == 200
    job: dict[str, Any] = got.json()
    return job


# -- independent fits, written from the contract's definitions ------------------------------------


def baseline_design(frame: pd.DataFrame) -> pd.DataFrame:
    b = frame[frame["wave"] == "baseline"].set_index("participant").sort_index()
    d = pd.DataFrame(index=b.index)
    d["online"] = b["online_30d"].astype(float)
    d["woman"] = (b["gender"] == "woman").astype(float)
    d["age"] = b["age"].astype(float)
    d["white"] = (b["race"] == "white").astype(float)
    d["hispanic"] = b["hispanic"].astype(float)
    d["married"] = (b["marital_status"] == "married_partnered").astype(float)
    d["college"] = b["education"].isin(["bachelors", "graduate"]).astype(float)
    d["employed"] = b["employment"].isin(["full_time", "part_time"]).astype(float)
    d["alcohol_last_use[within_30d]"] = (b["alcohol_last_use"] == "within_30d").astype(float)
    d["alcohol_last_use[30d_to_1y]"] = (b["alcohol_last_use"] == "30d_to_1y").astype(float)
    d["drug_last_use[within_1y]"] = b["drug_last_use"].isin(["within_30d", "30d_to_1y"]).astype(float)
    d["drug_last_use[1y_to_5y]"] = (b["drug_last_use"] == "1y_to_5y").astype(float)
    d["aud_severity"] = b["aud_severity"].astype(float)
    d["self_efficacy_score"] = b["self_efficacy_score"].astype(float)
    d["multiple_groups"] = b["multiple_groups"].astype(float)
    d["goal_abstinence"] = (b["recovery_goal"] == "abstinence_forever").astype(float)
    d["group"] = b["primary_group"]
    d["primary_group[aa_12step]"] = (b["primary_group"] == "aa_12step").astype(float)
    d["primary_group[wfs]"] = (b["primary_group"] == "wfs").astype(float)
    d["intercept"] = 1.0
    return d


def statsmodels_logit(frame: pd.DataFrame) -> Any:
    d = baseline_design(frame)
    d = d[~d["group"].isin(["other", "none"])].dropna(subset=["online", *ONLINE_TERMS[1:]])
    return sm.Logit(d["online"], d[ONLINE_TERMS]).fit(disp=0, method="newton", maxiter=100)


def statsmodels_gee(frame: pd.DataFrame, model2: bool, outcome: str = "alcohol_abstinent_30d") -> Any:
    d = baseline_design(frame)
    if model2:
        d = d[~d["group"].isin(["other", "none"])]
    long = frame[["participant", "wave", outcome]].merge(d, left_on="participant", right_index=True)
    long["abstinent"] = long[outcome].astype(float)
    for w in ("month6", "month12"):
        long[f"wave[{w}]"] = (long["wave"] == w).astype(float)
        long[f"online:wave[{w}]"] = long["online"] * long[f"wave[{w}]"]
    terms = MODEL2_TERMS if model2 else GEE_TERMS
    long = long.dropna(subset=["abstinent", *terms])
    long["w"] = long["wave"].map({"baseline": 0, "month6": 1, "month12": 2})
    long = long.sort_values(["participant", "w"]).reset_index(drop=True)
    model = GEE(long["abstinent"], long[terms], groups=pd.factorize(long["participant"])[0],
                family=sm.families.Binomial(), cov_struct=Exchangeable())
    return model.fit(maxiter=100)


def assert_same(job: dict[str, Any], reference: Any, terms: list[str]) -> None:
    coefficients = {c["term"]: c for c in job["results"]["coefficients"]}
    assert list(coefficients) == terms  # the contract's names, in its order
    for term in terms:
        assert abs(coefficients[term]["estimate"] - reference.params[term]) < 1e-8, term
        assert abs(coefficients[term]["std_error"] - reference.bse[term]) < 1e-8, term
        assert abs(coefficients[term]["p_value"] - reference.pvalues[term]) < 1e-8, term
        low, high = np.exp(reference.conf_int(0.05).loc[term])
        assert coefficients[term]["ci_low"] == pytest.approx(low, rel=1e-9)
        assert coefficients[term]["ci_high"] == pytest.approx(high, rel=1e-9)
        assert coefficients[term]["odds_ratio"] == pytest.approx(math.exp(reference.params[term]), rel=1e-12)


def assert_same_contrasts(job: dict[str, Any], reference: Any) -> None:
    """Each contrast against statsmodels' own t_test of the same linear combination (robust covariance)."""
    got = {c["term"]: c for c in job["results"]["contrasts"]}
    assert list(got) == list(CONTRASTS)
    names = list(reference.params.index)
    for name, terms in CONTRASTS.items():
        weights = np.array([[1.0 if n in terms else 0.0 for n in names]])
        test = reference.t_test(weights)
        estimate, se = float(np.squeeze(test.effect)), float(np.squeeze(test.sd))
        low, high = np.squeeze(test.conf_int(alpha=0.05))
        assert abs(got[name]["estimate"] - estimate) < 1e-8, name
        assert abs(got[name]["std_error"] - se) < 1e-8, name
        assert abs(got[name]["p_value"] - float(np.squeeze(test.pvalue))) < 1e-8, name
        assert got[name]["ci_low"] == pytest.approx(math.exp(low), rel=1e-9)
        assert got[name]["ci_high"] == pytest.approx(math.exp(high), rel=1e-9)


def assert_counts_add_up(results: dict[str, Any], frame: pd.DataFrame) -> None:
    """n + every exclusion (each participant once) = the participants with a baseline response."""
    with_baseline = frame.loc[frame["wave"] == "baseline", "participant"].nunique()
    assert results["n"] + sum(e["n"] for e in results["excluded"]) == with_baseline
    assert results["population"]["participants"] == with_baseline
    assert results["population"]["without_response_at_wave"] == frame["participant"].nunique() - with_baseline


async def exported_frame(client: httpx.AsyncClient, token: str, job: dict[str, Any]) -> pd.DataFrame:
    r = await client.get(f"/api/v1/analyses/{job['id']}/frame", headers=auth(token))
    assert r.status_code == 200 and r.headers["content-type"] == "application/vnd.apache.parquet"
    frame = pd.read_parquet(io.BytesIO(r.content))
    assert len(frame) == job["data"]["n_observations"]
    assert frame["participant"].nunique() == job["data"]["n_participants"]
    return frame


@pytest.fixture
async def cohort(app_client: httpx.AsyncClient, analyst: str, database: Database,
                 settings: Settings) -> AsyncIterator[dict[str, Any]]:
    yield simulate_into(database, settings, 700, seed=11)


async def test_online_attendance_equals_statsmodels_on_the_exported_frame(
    app_client: httpx.AsyncClient, analyst: str, database: Database, settings: Settings, cohort: dict[str, Any]
) -> None:
    job = await fit(app_client, analyst, database, settings, {"model": "online_attendance"})
    assert job["status"] == "succeeded", job["error"]
    assert job["software"]["statsmodels"] == sm.__version__ and job["software"]["python"]
    assert job["software"]["cohort"] and len(job["software"].get("cohort_git_commit", "x" * 40)) == 40
    assert len(job["data"]["snapshot_sha256"]) == 64 and job["data"]["n_participants"] == 700
    frame = await exported_frame(app_client, analyst, job)
    reference = statsmodels_logit(frame)
    assert_same(job, reference, ONLINE_TERMS)
    results = job["results"]
    assert results["plan_version"] == job["plan_version"] == 1
    assert results["formula"].startswith("online_30d ~ 1 + woman + age + white")
    assert results["n"] == results["n_observations"] == reference.nobs and results["converged"] is True
    excluded = {e["reason"]: e["n"] for e in results["excluded"]}
    assert set(excluded) <= {"baseline primary group is other or none", "missing a model variable"}
    assert excluded["baseline primary group is other or none"] == int(
        frame.loc[frame["wave"] == "baseline", "primary_group"].isin(["other", "none"]).sum())
    assert_counts_add_up(results, frame)


@pytest.mark.parametrize("variant", [None, "model2"])
async def test_abstinence_gee_equals_statsmodels_on_the_exported_frame(
    app_client: httpx.AsyncClient, analyst: str, database: Database, settings: Settings, cohort: dict[str, Any],
    variant: str | None,
) -> None:
    body = {"model": "abstinence", **({"variant": variant} if variant else {})}
    job = await fit(app_client, analyst, database, settings, body)
    assert job["status"] == "succeeded", job["error"]
    assert job["variant"] == variant and job["plan_version"] == 1
    frame = await exported_frame(app_client, analyst, job)
    reference = statsmodels_gee(frame, model2=variant == "model2")
    assert_same(job, reference, MODEL2_TERMS if variant else GEE_TERMS)
    assert_same_contrasts(job, reference)
    results = job["results"]
    assert results["outcome"] == "alcohol_abstinent_30d" and results["cov_type"] == "robust"
    assert results["n_observations"] == reference.nobs
    assert results["n"] == len(set(reference.model.groups))
    in_model = frame[frame["participant"].isin(
        frame.loc[frame["wave"] == "baseline", "participant"])]
    if variant:
        groups = frame.loc[frame["wave"] == "baseline"].set_index("participant")["primary_group"]
        in_model = in_model[~in_model["participant"].map(groups).isin(["other", "none"])]
    assert results["n_by_wave"] == {w: int((in_model["wave"] == w).sum()) for w in ("baseline", "month6", "month12")}
    assert results["within_participant_correlation"] == pytest.approx(reference.model.cov_struct.dep_params, abs=1e-10)
    assert results["working_correlation"] == "exchangeable" and results["family"] == "binomial"
    assert_counts_add_up(results, frame)
    if variant:  # each left-out participant once, under one reason
        assert [e["reason"] for e in results["excluded"]] == ["baseline primary group is other or none"]


async def test_abstinence_any_keeps_the_old_outcome(
    app_client: httpx.AsyncClient, analyst: str, database: Database, settings: Settings, cohort: dict[str, Any],
) -> None:
    job = await fit(app_client, analyst, database, settings, {"model": "abstinence_any"})
    assert job["status"] == "succeeded", job["error"]
    reference = statsmodels_gee(await exported_frame(app_client, analyst, job), model2=False, outcome="abstinent_30d")
    assert job["results"]["outcome"] == "abstinent_30d"
    assert_same(job, reference, GEE_TERMS)


async def test_table1_matches_scipy(app_client: httpx.AsyncClient, analyst: str, database: Database,
                                    settings: Settings, cohort: dict[str, Any]) -> None:
    job = await fit(app_client, analyst, database, settings, {"model": "table1"})
    assert job["status"] == "succeeded", job["error"]
    frame = await exported_frame(app_client, analyst, job)
    base = frame[frame["wave"] == "baseline"]
    online = base["online_30d"].astype(bool)
    rows = {v["variable"]: v for v in job["results"]["variables"]}
    assert job["results"]["n"] == {"online": int(online.sum()), "not_online": int((~online).sum())}
    assert job["results"]["population"] == {"wave": "baseline", "participants": len(base),
                                            "without_response_at_wave": 0}
    age = rows["age"]
    welch = scipy_stats.ttest_ind(base.loc[online, "age"].astype(float), base.loc[~online, "age"].astype(float),
                                  equal_var=False)
    assert age["test"] == "welch-t" and age["p_value"] == pytest.approx(welch.pvalue, rel=1e-9)
    assert age["online"]["mean"] == pytest.approx(base.loc[online, "age"].astype(float).mean())
    gender = rows["gender"]
    table = pd.crosstab(base["gender"], online)
    _, p, dof, expected = scipy_stats.chi2_contingency(table.to_numpy(), correction=False)
    assert gender["test"] == "chi-square" and gender["p_value"] == pytest.approx(p, rel=1e-9) and gender["df"] == dof
    assert gender["expected_below_5"] == bool((expected < 5).any())
    woman = next(level for level in gender["levels"] if level["level"] == "woman")
    assert woman["online"]["n"] == int(((base["gender"] == "woman") & online).sum())
    # levels in codebook order, every option listed
    options = {it["code"]: [o["code"] for o in it.get("options") or []]
               for inst in pal_codebook()["instruments"] for it in inst["items"]}
    for name in ("gender", "race", "education", "alcohol_last_use", "drug_last_use", "primary_group"):
        assert [lv["level"] for lv in rows[name]["levels"]] == options[name], name
    flagged = [v["variable"] for v in job["results"]["variables"] if v.get("expected_below_5")]
    assert flagged and all(name in job["results"]["notes"][0] for name in flagged)
    report = await app_client.get(f"/api/v1/analyses/{job['id']}/report", headers=auth(analyst))
    assert report.status_code == 200 and "Baseline characteristics" in report.text


async def test_identical_requests_on_unchanged_data_reuse_the_result(
    app_client: httpx.AsyncClient, admin: httpx.AsyncClient, analyst: str, database: Database, settings: Settings,
    cohort: dict[str, Any],
) -> None:
    first = await fit(app_client, analyst, database, settings, {"model": "online_attendance"})
    again = await app_client.post(f"{BASE}/analyses", json={"model": "online_attendance"}, headers=auth(analyst))
    assert again.status_code == 202
    assert again.json() == {"id": first["id"], "status": "succeeded", "model": "online_attendance", "variant": None,
                            "plan_version": 1, "reused": True}
    # a correction changes the data: a new fit, with another snapshot
    listed = (await admin.get(f"{BASE}/responses", params={"wave": "baseline", "limit": 1})).json()["items"][0]
    r = await admin.patch(f"{BASE}/responses/{listed['id']}", json={"answers": {"age": 77}, "reason": "typo"})
    assert r.status_code == 200
    second = await fit(app_client, analyst, database, settings, {"model": "online_attendance"})
    assert second["id"] != first["id"]
    assert second["data"]["snapshot_sha256"] != first["data"]["snapshot_sha256"]
    report = await app_client.get(f"/api/v1/analyses/{second['id']}/report", headers=auth(analyst))
    woman = next(c for c in second["results"]["coefficients"] if c["term"] == "woman")
    assert f"{woman['odds_ratio']:.3f}" in report.text and f"{woman['ci_low']:.3f}" in report.text
    listing = (await app_client.get(f"{BASE}/analyses", headers=auth(analyst))).json()["items"]
    assert [a["id"] for a in listing] == [first["id"], second["id"]]


def count_reads(monkeypatch: pytest.MonkeyPatch) -> list[list[Any] | None]:
    """Each database read of an analysis frame: None for a whole read, else the responses read."""
    from app.analysis import frame as frames

    reads: list[list[Any] | None] = []
    read = frames.read

    def counted(*args: Any, **kwargs: Any) -> Any:
        reads.append(kwargs.get("only"))
        return read(*args, **kwargs)

    monkeypatch.setattr(frames, "read", counted)
    return reads


def whole_frame(database: Database, settings: Settings) -> pd.DataFrame:
    """The frame read whole from the database (not counted by `count_reads`)."""
    with transaction(database) as session:
        ctx = system_context(session, "pal")
        return read_frame(session, ctx, pseudonymiser(session, ctx.study, settings_sealer(settings))).frame


async def test_a_fit_on_unchanged_data_reads_the_kept_snapshot(
    app_client: httpx.AsyncClient, admin: httpx.AsyncClient, analyst: str, database: Database, settings: Settings,
    cohort: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = await fit(app_client, analyst, database, settings, {"model": "online_attendance"})
    assert first["status"] == "succeeded", first["error"]
    reads = count_reads(monkeypatch)
    second = await fit(app_client, analyst, database, settings, {"model": "abstinence"})
    assert second["status"] == "succeeded", second["error"]
    assert reads == []  # the data had not changed: the kept snapshot was the frame
    assert second["data"]["snapshot_sha256"] == first["data"]["snapshot_sha256"]
    listed = (await admin.get(f"{BASE}/responses", params={"wave": "baseline", "limit": 1})).json()["items"][0]
    r = await admin.patch(f"{BASE}/responses/{listed['id']}", json={"answers": {"age": 78}, "reason": "typo"})
    assert r.status_code == 200
    third = await fit(app_client, analyst, database, settings, {"model": "abstinence"})
    assert len(reads) == 1 and reads[0] is not None  # only what changed is read again
    assert str(listed["id"]) in {str(i) for i in reads[0]}
    assert third["data"]["snapshot_sha256"] != first["data"]["snapshot_sha256"]
    frame = await exported_frame(app_client, analyst, third)
    assert (frame["age"] == 78).sum() >= 1


async def test_after_new_data_the_frame_equals_a_whole_read(
    app_client: httpx.AsyncClient, admin: httpx.AsyncClient, analyst: str, database: Database, settings: Settings,
    cohort: dict[str, Any], monkeypatch: pytest.MonkeyPatch, connection: Connection,
) -> None:
    """A refit after new data reads only the rows whose versions moved and keeps the rest from the
    last frame; whatever changed (a correction whose carried values move into later waves, a new
    participant, answers deleted on withdrawal, a writer that bypasses the service, a codebook
    revision), the frame is the one a whole read gives, hash for hash."""
    from app.analysis import frame as frames

    first = await fit(app_client, analyst, database, settings, {"model": "abstinence"})
    assert first["status"] == "succeeded", first["error"]
    reads = count_reads(monkeypatch)
    rows = (await admin.get(f"{BASE}/responses", params={"limit": 500})).json()["items"]
    waves: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        waves.setdefault(row["external_id"], {})[row["wave"]] = row
    person, stored = next((p, w) for p, w in waves.items() if {"baseline", "month6", "month12"} <= set(w)
                          and all(r["status"] == "complete" for r in w.values()))
    before = {w: r["derived"]["aud_severity"] for w, r in stored.items()}
    flipped = not stored["baseline"]["answers"]["aud_1"]

    async def refit_equals_whole_read(expect_whole: bool = False) -> dict[str, Any]:
        job = await fit(app_client, analyst, database, settings, {"model": "abstinence"})
        assert job["status"] == "succeeded", job["error"]
        assert (reads[-1] is None) == expect_whole
        assert job["data"]["snapshot_sha256"] == frames.snapshot_sha256(whole_frame(database, settings))
        return job

    # a baseline correction: aud_severity is carried from baseline, so the later waves change too
    r = await admin.patch(f"{BASE}/responses/{stored['baseline']['id']}",
                          json={"answers": {"aud_1": flipped}, "reason": "re-read the form"})
    assert r.status_code == 200, r.text
    job = await refit_equals_whole_read()
    assert {str(i) for i in reads[-1] or []} == {r["id"] for r in stored.values()}
    now = (await admin.get(f"{BASE}/responses", params={"external_id": person})).json()["items"]
    after = {row["wave"]: row["derived"]["aud_severity"] for row in now}
    assert after["month6"] == after["month12"] == after["baseline"] != before["baseline"]
    frame = await exported_frame(app_client, analyst, job)
    assert sorted(frame.loc[frame["aud_severity"] == after["baseline"], "wave"]).count("month12") >= 1

    # a new participant with a complete baseline
    enrolled = (datetime.now(UTC) - timedelta(days=2)).isoformat()
    assert (await admin.post(f"{BASE}/participants", json={"external_id": "LATE1",
                                                           "enrolled_at": enrolled})).status_code == 201
    answers = valid_answers("baseline", random.Random(3))
    r = await admin.post(f"{BASE}/responses", json={"external_id": "LATE1", "wave": "baseline", "answers": answers})
    assert r.status_code == 201, r.text
    await refit_equals_whole_read()
    assert [str(i) for i in reads[-1] or []] == [r.json()["id"]]

    # answers deleted on withdrawal, and a writer that bypasses the service (and its updated_at)
    assert (await admin.patch(BASE, json={"withdrawal_policy": "delete_responses"})).status_code == 200
    r = await admin.post(f"{BASE}/participants/{person}/withdraw", json={"reason": "withdrew consent"})
    assert r.status_code == 200, r.text
    connection.execute(text("UPDATE responses SET answers = jsonb_set(answers, '{age}', '99') "
                            "WHERE id = (SELECT id FROM responses WHERE wave = 'month6' AND status = 'complete' "
                            "ORDER BY id LIMIT 1)"))
    await refit_equals_whole_read()
    assert len(reads[-1] or []) == 1

    # a codebook revision changes the frame's basis: a whole read
    document = pal_codebook()
    document["version"] = 3
    next(d for d in document["derived"] if d["code"] == "weekly_attendance")["definition"] = "meetings_30d >= 9"
    assert (await admin.put(f"{BASE}/codebook", json=document)).status_code == 200
    await refit_equals_whole_read(expect_whole=True)


async def test_the_frame_and_the_export_read_the_same_derived_values(
    app_client: httpx.AsyncClient, admin: httpx.AsyncClient, analyst: str, database: Database, settings: Settings,
    cohort: dict[str, Any],
) -> None:
    """A definition changed and not yet recomputed by the periodic task: an export and a fit
    read the new definition's values alike (neither serves the stale stored ones)."""
    document = pal_codebook()
    document["version"] = 3
    next(d for d in document["derived"] if d["code"] == "weekly_attendance")["definition"] = "meetings_30d >= 9"
    assert (await admin.put(f"{BASE}/codebook", json=document)).status_code == 200
    export = await app_client.get(f"{BASE}/export", params={"format": "csv", "layout": "long"}, headers=auth(analyst))
    assert export.status_code == 200
    exported = pd.read_csv(io.StringIO(export.text)).set_index(["participant", "wave"]).sort_index()
    job = await fit(app_client, analyst, database, settings, {"model": "online_attendance"})
    assert job["status"] == "succeeded", job["error"]
    frame = (await exported_frame(app_client, analyst, job)).set_index(["participant", "wave"]).sort_index()
    assert list(frame.index) == list(exported.index)
    expected = (exported["meetings_30d"] >= 9).where(exported["meetings_30d"].notna())
    known = exported["weekly_attendance"].notna()
    assert known.sum() > 100
    assert (exported.loc[known, "weekly_attendance"] == expected[known]).all()
    assert (frame.loc[known, "weekly_attendance"] == exported.loc[known, "weekly_attendance"]).all()
    assert (frame["weekly_attendance"].isna() == exported["weekly_attendance"].isna()).all()
    assert ((exported["meetings_30d"] >= 4) & (exported["meetings_30d"] < 9)).sum() > 0  # the change shows


async def test_the_same_snapshot_gives_the_same_numbers(database: Database, settings: Settings,
                                                        admin: httpx.AsyncClient) -> None:
    from app.analysis import frame as frames
    from app.analysis import plan as plans
    from app.analysis.fit import run

    await create_study(admin, ADMIN_TOKEN, key="pal")
    simulate_into(database, settings, 300, seed=5)
    with transaction(database) as session:
        ctx = system_context(session, "pal")
        pseudonymise = pseudonymiser(session, ctx.study, settings_sealer(settings))
        one = frames.read(session, ctx, pseudonymise).frame
        two = frames.read(session, ctx, pseudonymise).frame
        codebook = ctx.require_codebook()
    assert frames.snapshot_sha256(one) == frames.snapshot_sha256(two)
    doc = plans.PlanDoc.model_validate(plans.shipped_plan("pal-v1"))
    spec = plans.resolve(doc.models["abstinence"], doc.variables, None, codebook, key="abstinence", plan_version=1)
    assert run(spec, one) == run(spec, two)
    restored = frames.from_parquet(frames.to_parquet(one))
    assert frames.snapshot_sha256(restored) == frames.snapshot_sha256(one)


async def test_bad_data_fails_with_a_readable_message(app_client: httpx.AsyncClient, admin: httpx.AsyncClient,
                                                      analyst: str, database: Database, settings: Settings) -> None:
    empty = await fit(app_client, analyst, database, settings, {"model": "online_attendance"})
    assert empty["status"] == "failed" and "no complete" in empty["error"]

    cohort = generate(120, 3, enrolled_from=default_start())
    for r in cohort.responses:  # everyone in the model's groups is in SMART Recovery
        if r.answers.get("primary_group") not in (None, "none", "other"):
            r.answers["primary_group"] = "smart"
            r.answers["groups_30d"] = ["smart"]
    with transaction(database) as session:
        write(session, system_context(session, "pal"), cohort, settings_sealer(settings), datetime.now(UTC))
    one_group = await fit(app_client, analyst, database, settings, {"model": "online_attendance"})
    assert one_group["status"] == "failed" and "only one primary_group level" in one_group["error"]
    model2 = await fit(app_client, analyst, database, settings, {"model": "abstinence", "variant": "model2"})
    assert model2["status"] == "failed" and "only one primary_group level" in model2["error"]
    model1 = await fit(app_client, analyst, database, settings, {"model": "abstinence"})
    assert model1["status"] == "succeeded"  # model 1 does not use primary_group


async def test_perfect_separation_fails_cleanly(app_client: httpx.AsyncClient, analyst: str, database: Database,
                                                settings: Settings) -> None:
    cohort = generate(150, 4, enrolled_from=default_start())
    rng = random.Random(4)
    for r in cohort.responses:
        if r.wave == "baseline":  # online attendance exactly when a woman: woman separates the outcome
            woman = r.answers["gender"] == "woman"
            r.answers["meetings_30d"] = max(r.answers["meetings_30d"], 1)
            r.answers["online_meetings_30d"] = rng.randint(1, r.answers["meetings_30d"]) if woman else 0
    with transaction(database) as session:
        write(session, system_context(session, "pal"), cohort, settings_sealer(settings), datetime.now(UTC))
    job = await fit(app_client, analyst, database, settings, {"model": "online_attendance"})
    assert job["status"] == "failed"
    assert "separation" in job["error"] or "converge" in job["error"]


async def test_requests_are_validated(app_client: httpx.AsyncClient, analyst: str, admin: httpx.AsyncClient) -> None:
    r = await app_client.post(f"{BASE}/analyses", json={"model": "cox"}, headers=auth(analyst))
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["model"]
    r = await app_client.post(f"{BASE}/analyses", json={"model": "table1", "variant": "model2"}, headers=auth(analyst))
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["variant"]
    collector = await create_token(admin, ADMIN_TOKEN, "collector")
    r = await app_client.post(f"{BASE}/analyses", json={"model": "table1"}, headers=auth(collector))
    assert r.status_code == 403
    r = await app_client.get("/api/v1/analyses/00000000-0000-0000-0000-000000000000", headers=auth(analyst))
    assert r.status_code == 404


@pytest.mark.slow
def test_simulated_true_effects_are_recovered() -> None:
    """5,000 participants, three seeds: the true odds ratios of the two exactly specified models
    (the online Logit and the simulator's generating GEE, model 2 plus primary group x wave)
    fall inside the reported 95 % intervals at about the nominal rate. 12-step members attend
    online more and are abstinent more often later, so model 1 (no primary group) credits online
    attendance with part of that: model 2 reports weaker online effects at 6 and 12 months."""
    from app.analysis import plan as plans
    from app.analysis.fit import run
    from app.analysis.simulate import generating_spec
    from tests.simulated import CODEBOOK, frame_of

    doc = plans.PlanDoc.model_validate(plans.shipped_plan("pal-v1"))

    def spec(key: str, variant: str | None) -> dict[str, Any]:
        return plans.resolve(doc.models[key], doc.variables, variant, CODEBOOK, key=key, plan_version=1)

    one_off = plans.parse(generating_spec(), plans.SpecDoc)
    plans.check_spec(one_off, doc, CODEBOOK)
    generating = plans.resolve(one_off, doc.variables, None, CODEBOOK, key="spec", plan_version=1)
    covered, total, misses = 0, 0, []
    for seed in (101, 202, 303):
        cohort = generate(5000, seed, enrolled_from=default_start())
        frame = frame_of(cohort)
        model1 = run(spec("abstinence", None), frame)
        model2 = run(spec("abstinence", "model2"), frame)
        exact = run(generating, frame)
        assert [c["term"] for c in exact["coefficients"]] == list(cohort.truth["abstinence_generating"])
        checks = (("online_attendance", run(spec("online_attendance", None), frame)["coefficients"]),
                  ("abstinence_generating", exact["coefficients"]),
                  ("abstinence_generating_contrasts", exact["contrasts"]))
        for key, rows in checks:
            for c in rows:
                true_or = math.exp(cohort.truth[key][c["term"]])
                total += 1
                if c["ci_low"] <= true_or <= c["ci_high"]:
                    covered += 1
                else:
                    misses.append((seed, key, c["term"]))
        # adjusting for primary group weakens the online effects at the follow-ups (the paper's model 2)
        one = {c["term"]: c["estimate"] for c in model1["contrasts"]}
        two = {c["term"]: c["estimate"] for c in model2["contrasts"]}
        for name in ("online at month6", "online at month12"):
            assert one[name] > two[name], (seed, name, one[name], two[name])
        truth = cohort.truth["abstinence_generating_contrasts"]
        assert truth["online at baseline"] < 0 < truth["online at month6"]  # the seed study's directions
        assert abs(truth["online at month12"]) < 0.1
        later = cohort.truth["abstinence_generating"]
        assert later["primary_group[aa_12step]:wave[month6]"] > 0 < later["primary_group[aa_12step]:wave[month12]"]
    assert total == 3 * (18 + 16 + 3)
    assert covered / total >= 0.88, misses  # nominal 95 %; binomial noise over 111 intervals
    assert 0.30 <= cohort.truth["online_share"] <= 0.42  # close to the study's 36 % online


def test_simulate_show_truth_prints_the_truth_table() -> None:
    import json

    from typer.testing import CliRunner

    from app.analysis.simulate import truth_table
    from app.cli import cli

    result = CliRunner().invoke(cli, ["simulate", "--show-truth"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown == truth_table()
    assert list(shown["online_attendance"]) == ONLINE_TERMS[1:]
    assert list(shown["abstinence_generating"]) == [*MODEL2_TERMS, *GENERATING_EXTRA]
    assert list(shown["abstinence_generating_contrasts"]) == list(CONTRASTS)
    assert shown["abstinence_model1"] is None and shown["abstinence_model2"] is None
