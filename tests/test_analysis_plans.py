"""Analysis plans through the API: PAL's shipped plan, versions and audit, validation with
paths, text that looks like code stays data, and a second study with its own codebook and
waves that gets its models by writing a plan (fits checked against statsmodels here)."""

from __future__ import annotations

import copy
import io
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from statsmodels.genmod.cov_struct import Exchangeable
from statsmodels.genmod.generalized_estimating_equations import GEE

from app.core.crypto import settings_sealer
from app.core.db import Database, transaction
from app.core.settings import Settings
from app.participants import service as participants
from app.participants.schemas import ParticipantIn
from app.responses.service import NewResponse, submit_many
from app.studies.service import system_context
from tests.conftest import ADMIN_TOKEN
from tests.factories import auth, create_study, create_token
from tests.test_analyses import fit, simulate_into

pytestmark = pytest.mark.anyio

PLAN = "/api/v1/studies/pal/analysis-plan"


@pytest.fixture
async def analyst(admin: httpx.AsyncClient) -> str:
    await create_study(admin, ADMIN_TOKEN, key="pal")
    return await create_token(admin, ADMIN_TOKEN, "analyst")


async def test_pal_plan_is_served_and_each_change_is_a_new_audited_version(
    app_client: httpx.AsyncClient, admin: httpx.AsyncClient, analyst: str
) -> None:
    r = await app_client.get(PLAN, headers=auth(analyst))
    assert r.status_code == 200
    plan = r.json()
    assert plan["version"] == 1 and list(plan["models"]) == ["table1", "online_attendance", "abstinence",
                                                            "abstinence_any"]
    gee = plan["models"]["abstinence"]
    assert gee["outcome"] == "alcohol_abstinent_30d" and gee["working_correlation"] == "exchangeable"
    assert [c["name"] for c in gee["contrasts"]] == ["online at baseline", "online at month6", "online at month12"]
    assert plan["variables"]["primary_group"]["reference"] == "smart_lifering"
    assert plan["variables"]["primary_group"]["exclude"]["codes"] == ["other", "none"]

    coordinator = await create_token(admin, ADMIN_TOKEN, "coordinator")
    assert (await app_client.put(PLAN, json=plan, headers=auth(coordinator))).status_code == 403

    edited = copy.deepcopy(plan)  # the GET body round-trips
    edited["models"]["abstinence"]["variants"]["model2"]["add_terms"].append("college")
    r = await app_client.put(PLAN, json=edited, headers=auth(analyst))
    assert r.status_code == 200, r.text
    assert r.json()["version"] == 2
    assert (await app_client.get(PLAN, headers=auth(analyst))).json()["models"]["abstinence"]["variants"][
        "model2"]["add_terms"] == ["primary_group", "multiple_groups", "college"]
    stale = await app_client.put(PLAN, json=edited, headers=auth(analyst))  # still says version 1
    assert stale.status_code == 409
    audit = (await admin.get("/api/v1/studies/pal/audit", params={"table": "analysis_plans"})).json()["items"]
    # the template's plan was stored as version 1 by the first edit, then the edit as version 2
    audit.sort(key=lambda a: a["after"]["version"])  # one transaction: the same audit time
    assert [(a["action"], a["after"]["version"]) for a in audit] == [("INSERT", 1), ("INSERT", 2)]
    from app.analysis.plan import shipped_plan

    assert audit[0]["after"]["document"] == shipped_plan("pal-v1")


async def test_a_refit_after_a_plan_edit_cites_the_new_version_and_the_old_result_stays(
    app_client: httpx.AsyncClient, analyst: str, database: Database, settings: Settings
) -> None:
    simulate_into(database, settings, 300, seed=8)
    assert (await app_client.get(PLAN, headers=auth(analyst))).json()["created_at"] is None  # the template's, unstored
    before = await fit(app_client, analyst, database, settings, {"model": "abstinence", "variant": "model2"})
    assert before["status"] == "succeeded" and before["results"]["plan_version"] == 1
    # a result cites version 1: from now on the study keeps it, whatever a later release ships
    assert (await app_client.get(PLAN, headers=auth(analyst))).json()["created_at"] is not None
    plan = (await app_client.get(PLAN, headers=auth(analyst))).json()
    plan["models"]["abstinence"]["variants"]["model2"]["add_terms"].append("college")
    assert (await app_client.put(PLAN, json=plan, headers=auth(analyst))).status_code == 200
    after = await fit(app_client, analyst, database, settings, {"model": "abstinence", "variant": "model2"})
    assert after["id"] != before["id"] and after["plan_version"] == after["results"]["plan_version"] == 2
    assert [c["term"] for c in after["results"]["coefficients"]][-1] == "college"
    assert "+ college" in after["results"]["formula"]
    again = (await app_client.get(f"/api/v1/analyses/{before['id']}", headers=auth(analyst))).json()
    assert again["results"] == before["results"] and again["plan_version"] == 1


async def test_unknown_names_are_422_with_the_path_of_each(app_client: httpx.AsyncClient, analyst: str) -> None:
    plan = (await app_client.get(PLAN, headers=auth(analyst))).json()
    plan["variables"]["bogus"] = {"kind": "numeric", "source": "no_such_item"}
    plan["variables"]["primary_group"]["levels"][0]["codes"] = ["aa"]
    plan["variables"]["age"]["at"] = "month3"
    plan["models"]["abstinence"]["terms"][5] = "ages"
    plan["models"]["abstinence"]["rows"] = {"waves": ["baseline", "week9"]}
    plan["models"]["abstinence"]["contrasts"].append({"name": "x", "weights": {"online:wave[month9]": 1}})
    plan["models"]["online_attendance"]["outcome"] = "primary_group"  # levels, not one 0/1 column
    r = await app_client.put(PLAN, json=plan, headers=auth(analyst))
    assert r.status_code == 422 and r.headers["content-type"].startswith("application/problem+json")
    errors = {(tuple(e["loc"]), e["code"]) for e in r.json()["errors"]}
    assert {
        (("variables", "bogus", "source"), "unknown_variable"),
        (("variables", "primary_group", "levels", 0, "codes", 0), "unknown_level"),
        (("variables", "age", "at"), "unknown_wave"),
        (("models", "abstinence", "terms", 5), "unknown_variable"),
        (("models", "abstinence", "rows", "waves", 1), "unknown_wave"),
        (("models", "abstinence", "contrasts", 3, "weights", "online:wave[month9]"), "unknown_term"),
        (("models", "online_attendance", "outcome"), "type"),
    } <= errors
    assert (await app_client.get(PLAN, headers=auth(analyst))).json()["version"] == 1  # nothing stored
    r = await app_client.post("/api/v1/studies/pal/analyses", headers=auth(analyst), json={"spec": {
        "kind": "logistic", "outcome": "online_30d", "terms": ["woman", "primary_group"],
        "rows": {"waves": ["month3"]}}})
    assert r.status_code == 422
    assert {(tuple(e["loc"]), e["code"]) for e in r.json()["errors"]} == {
        (("spec", "rows", "waves", 0), "unknown_wave")}


async def test_text_that_looks_like_code_is_stored_as_data_or_rejected_never_run(
    app_client: httpx.AsyncClient, analyst: str, database: Database, settings: Settings, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    payload = f"__import__('os').system('touch {marker}')"
    plan = (await app_client.get(PLAN, headers=auth(analyst))).json()
    plan["models"]["abstinence"]["label"] = payload  # a label is text: kept verbatim
    plan["models"]["abstinence"]["contrasts"][0]["name"] = payload
    r = await app_client.put(PLAN, json=plan, headers=auth(analyst))
    assert r.status_code == 200 and r.json()["models"]["abstinence"]["label"] == payload
    for bad, loc in ((["C(woman)"], ["models", "online_attendance", "terms", 0]),
                     ([payload], ["models", "online_attendance", "terms", 0])):
        attempt = copy.deepcopy(r.json())
        attempt["models"]["online_attendance"]["terms"] = bad
        refused = await app_client.put(PLAN, json=attempt, headers=auth(analyst))
        assert refused.status_code == 422 and refused.json()["errors"][0]["loc"] == loc
        assert refused.json()["errors"][0]["code"] == "unknown_variable"
    named = copy.deepcopy(r.json())
    named["variables"][payload] = {"kind": "numeric", "source": "age"}
    refused = await app_client.put(PLAN, json=named, headers=auth(analyst))
    assert refused.status_code == 422 and ["variables", payload] in [e["loc"] for e in refused.json()["errors"]]
    spec = await app_client.post("/api/v1/studies/pal/analyses", headers=auth(analyst),
                                 json={"spec": {"kind": "logistic", "outcome": payload, "terms": ["C(age)"]}})
    assert spec.status_code == 422
    assert {tuple(e["loc"]) for e in spec.json()["errors"]} == {("spec", "outcome"), ("spec", "terms", 0)}
    simulate_into(database, settings, 200, seed=9)
    job = await fit(app_client, analyst, database, settings, {"model": "abstinence"})
    assert job["status"] == "succeeded" and job["results"]["label"] == payload
    assert job["results"]["contrasts"][0]["term"] == payload
    one_off = await fit(app_client, analyst, database, settings, {"spec": {
        "kind": "logistic", "label": payload, "outcome": "online_30d", "rows": {"waves": ["baseline"]},
        "terms": ["woman", "age"]}})
    assert one_off["status"] == "succeeded", one_off["error"]
    assert one_off["model"] == "spec" and [c["term"] for c in one_off["results"]["coefficients"]] == [
        "intercept", "woman", "age"]
    assert not marker.exists()


# -- a second study: its own codebook, waves intake and followup, no code change --------------------

SECOND = {
    "key": "craving-v1", "version": 1, "title": "Craving and drinking after a brief intervention",
    "waves": [
        {"key": "intake", "label": "Intake", "offset_days": 0, "window_open_days": 0, "window_close_days": 14},
        {"key": "followup", "label": "Follow-up", "offset_days": 28, "window_open_days": 21,
         "window_close_days": 42},
    ],
    "reminder_policy": {"invite_on_open": True, "reminder_days_after_open": [3], "final_days_before_close": 2,
                        "channel": "email"},
    "instruments": [{
        "key": "survey", "label": "Survey", "waves": ["intake", "followup"],
        "items": [
            {"code": "sex", "type": "single_choice", "label": "Sex", "required": True, "waves": ["intake"],
             "options": [{"code": "female", "label": "Female"}, {"code": "male", "label": "Male"}]},
            {"code": "years", "type": "integer", "label": "Age in years", "min": 18, "max": 99, "required": True,
             "waves": ["intake"]},
            {"code": "arm", "type": "single_choice", "label": "Arm", "required": True, "waves": ["intake"],
             "options": [{"code": "control", "label": "Control"}, {"code": "brief", "label": "Brief"},
                         {"code": "extended", "label": "Extended"}]},
            {"code": "craving", "type": "integer", "label": "Craving 0-10", "min": 0, "max": 10, "required": True,
             "waves": ["intake", "followup"]},
            {"code": "drank", "type": "boolean", "label": "Drank this week", "required": True,
             "waves": ["intake", "followup"]},
        ],
    }],
    "rules": [],
    "derived": [{"code": "high_craving", "type": "boolean", "definition": "craving >= 6"}],
}

SECOND_PLAN: dict[str, Any] = {
    "variables": {
        "female": {"kind": "indicator", "source": "sex", "codes": ["female"], "at": "intake"},
        "age": {"kind": "numeric", "source": "years", "at": "intake"},
        "arm": {"kind": "categorical", "source": "arm", "at": "intake", "reference": "control", "levels": [
            {"name": "control", "codes": ["control"]}, {"name": "brief", "codes": ["brief"]},
            {"name": "extended", "codes": ["extended"]}]},
        "time": {"kind": "wave", "reference": "intake"},
    },
    "models": {
        "drinking": {"kind": "gee", "outcome": "drank", "terms": ["arm", "time", {"interaction": ["arm", "time"]},
                                                                   "female"],
                     "family": "binomial", "link": "logit", "working_correlation": "exchangeable",
                     "cluster": "participant",
                     "contrasts": [{"name": "extended at followup",
                                    "weights": {"arm[extended]": 1, "arm[extended]:time[followup]": 1}}]},
        "craving_at_intake": {"kind": "logistic", "outcome": "high_craving", "rows": {"waves": ["intake"]},
                              "terms": ["female", "age", "arm"]},
    },
}


def second_cohort(n: int, seed: int) -> tuple[list[ParticipantIn], list[NewResponse]]:
    rng = np.random.default_rng(seed)
    enrolled = datetime.now(UTC) - timedelta(days=90)
    roster, responses = [], []
    for i in range(n):
        ext = f"C{i:04d}"
        roster.append(ParticipantIn(external_id=ext, enrolled_at=enrolled))
        sex, arm = rng.choice(["female", "male"]), rng.choice(["control", "brief", "extended"])
        years = int(rng.integers(18, 80))
        for wave, day in (("intake", 1), ("followup", 30)):
            if wave == "followup" and rng.random() < 0.2:
                continue
            effect = {"control": 0.0, "brief": -0.3, "extended": -0.6}[arm] * (wave == "followup")
            drank = bool(rng.random() < 1 / (1 + math.exp(-(0.4 + effect + 0.3 * (sex == "female")))))
            craving = int(np.clip(rng.normal(5 + (0.5 if drank else -0.5), 2), 0, 10))
            answers: dict[str, Any] = {"craving": craving, "drank": drank}
            if wave == "intake":
                answers |= {"sex": str(sex), "years": years, "arm": str(arm)}
            responses.append(NewResponse(external_id=ext, wave=wave, answers=answers,
                                         completed_at=enrolled + timedelta(days=day)))
    return roster, responses


async def test_a_second_study_gets_its_models_by_writing_a_plan(
    app_client: httpx.AsyncClient, admin: httpx.AsyncClient, database: Database, settings: Settings
) -> None:
    await create_study(admin, ADMIN_TOKEN, key="craving", template=None, codebook=SECOND)
    analyst = await create_token(admin, ADMIN_TOKEN, "analyst")
    base = "/api/v1/studies/craving"
    empty = (await app_client.get(f"{base}/analysis-plan", headers=auth(analyst))).json()
    assert empty["version"] == 0 and empty["models"] == {}
    wrong = copy.deepcopy(SECOND_PLAN)
    wrong["variables"]["time"]["reference"] = "baseline"  # PAL's wave, not this study's
    r = await app_client.put(f"{base}/analysis-plan", json=wrong, headers=auth(analyst))
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["variables", "time", "reference"]
    r = await app_client.put(f"{base}/analysis-plan", json=SECOND_PLAN, headers=auth(analyst))
    assert r.status_code == 200, r.text
    roster, responses = second_cohort(400, seed=3)
    with transaction(database) as session:
        ctx = system_context(session, "craving")
        rows = [participants.ImportRow(i + 1, p) for i, p in enumerate(roster)]
        assert not participants.import_rows(session, ctx, rows, [], partial=False, sealer=settings_sealer(settings),
                                            now=datetime.now(UTC)).errors
        assert submit_many(session, ctx, responses, None, datetime.now(UTC)) == []

    gee_job = await fit(app_client, analyst, database, settings, {"model": "drinking"}, study="craving")
    assert gee_job["status"] == "succeeded", gee_job["error"]
    frame = pd.read_parquet(io.BytesIO((await app_client.get(
        f"/api/v1/analyses/{gee_job['id']}/frame", headers=auth(analyst))).content))
    intake = frame[frame["wave"] == "intake"].set_index("participant")
    long = frame.copy()
    long["female"] = long["participant"].map(intake["sex"] == "female").astype(float)
    arm = long["participant"].map(intake["arm"])
    long["time[followup]"] = (long["wave"] == "followup").astype(float)
    for level in ("brief", "extended"):
        long[f"arm[{level}]"] = (arm == level).astype(float)
        long[f"arm[{level}]:time[followup]"] = long[f"arm[{level}]"] * long["time[followup]"]
    long["intercept"] = 1.0
    long["w"] = long["wave"].map({"intake": 0, "followup": 1})
    long = long.sort_values(["participant", "w"]).reset_index(drop=True)
    terms = ["intercept", "arm[brief]", "arm[extended]", "time[followup]", "arm[brief]:time[followup]",
             "arm[extended]:time[followup]", "female"]
    reference = GEE(long["drank"].astype(float), long[terms], groups=pd.factorize(long["participant"])[0],
                    family=sm.families.Binomial(), cov_struct=Exchangeable()).fit(maxiter=100)
    got = {c["term"]: c for c in gee_job["results"]["coefficients"]}
    assert list(got) == terms
    for term in terms:
        assert abs(got[term]["estimate"] - reference.params[term]) < 1e-8
        assert abs(got[term]["std_error"] - reference.bse[term]) < 1e-8
    contrast = gee_job["results"]["contrasts"][0]
    test = reference.t_test(np.array([[1.0 if t in ("arm[extended]", "arm[extended]:time[followup]") else 0.0
                                       for t in terms]]))
    assert abs(contrast["estimate"] - float(np.squeeze(test.effect))) < 1e-8
    assert abs(contrast["std_error"] - float(np.squeeze(test.sd))) < 1e-8
    assert gee_job["results"]["n_by_wave"] == {"intake": int((frame["wave"] == "intake").sum()),
                                               "followup": int((frame["wave"] == "followup").sum())}
    assert gee_job["results"]["n"] + sum(e["n"] for e in gee_job["results"]["excluded"]) == len(intake)

    logit_job = await fit(app_client, analyst, database, settings, {"model": "craving_at_intake"}, study="craving")
    assert logit_job["status"] == "succeeded", logit_job["error"]
    d = intake.sort_index()
    x = pd.DataFrame({"intercept": 1.0, "female": (d["sex"] == "female").astype(float),
                      "age": d["years"].astype(float), "arm[brief]": (d["arm"] == "brief").astype(float),
                      "arm[extended]": (d["arm"] == "extended").astype(float)})
    logit = sm.Logit(d["high_craving"].astype(float), x).fit(disp=0, method="newton", maxiter=100)
    got = {c["term"]: c for c in logit_job["results"]["coefficients"]}
    assert list(got) == list(x.columns)
    for term in x.columns:
        assert abs(got[term]["estimate"] - logit.params[term]) < 1e-8
        assert abs(got[term]["std_error"] - logit.bse[term]) < 1e-8
