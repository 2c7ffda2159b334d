"""A synthetic PAL cohort with known true effects, written through the service layer.

The data-generating process makes both contract models exactly right, so their true
coefficients are known numbers, not estimates:

- Baseline abstinence depends on woman, age and aud_severity only (online has no effect at
  baseline), so given those, baseline alcohol and drug use carry no information about online
  attendance: in the online-attendance Logit the true coefficients of alcohol_recent and
  drug_recent are 0 and every other term is the generating coefficient.
- Online attendance is drawn from that Logit (intercept tuned to about 36 % online).
- Abstinence at each wave is drawn with exactly the GEE marginal model's probability,
  P = expit(b0 + b_wave + b_int_wave * online + b_w * woman + b_a * age + b_s * aud_severity),
  correlated within participant through a Gaussian copula (latent correlation 0.5), which
  leaves every marginal probability as given. primary_group and multiple_groups have no
  effect on abstinence given online, so model 2's true values are model 1's plus zeros.
- Follow-ups are answered with probability 0.81 (month 6) and 0.83 (month 12), at random.
"""

from __future__ import annotations

import bisect
import json
import math
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import brentq
from scipy.special import expit
from sqlalchemy.orm import Session

from app.analysis.stats import MODEL1_TERMS
from app.analysis.variables import GROUP_TERMS, ONLINE_PREDICTORS
from app.core.crypto import Sealer
from app.core.errors import Invalid
from app.participants import service as participants
from app.participants.schemas import ContactIn, ParticipantIn
from app.responses.service import NewResponse, submit_many
from app.studies.service import StudyContext

ONLINE_EFFECTS = {  # log odds, in the contract's order; the intercept is tuned
    "woman": 0.30, "age": -0.02, "white": -0.25, "hispanic": 0.20, "married": -0.15, "college": 0.35,
    "employed": -0.20, "alcohol_recent": 0.0, "drug_recent": 0.0, "aud_severity": 0.06,
    "self_efficacy_score": -0.20, "multiple_groups": 0.60, "goal_abstinence": 0.25,
    "primary_group[smart]": 0.80, "primary_group[lifering]": 0.50, "primary_group[wfs]": 1.00,
}
ABSTINENCE_EFFECTS = {
    "intercept": -0.20, "online": 0.0, "wave[month6]": 0.30, "wave[month12]": 0.45,
    "online:wave[month6]": 0.40, "online:wave[month12]": 0.30, "woman": 0.25, "age": 0.02, "aud_severity": -0.08,
}
LATENT_CORRELATION = 0.5
RESPONSE_RATES = {"month6": 0.81, "month12": 0.83}
TARGET_ONLINE = 0.36


@dataclass
class Cohort:
    participants: list[ParticipantIn]
    responses: list[NewResponse]
    truth: dict[str, Any]


_CUMULATIVE: dict[tuple[tuple[str, float], ...], tuple[list[str], list[float]]] = {}


def _choice(rng: np.random.Generator, options: dict[str, float]) -> str:
    """One weighted draw (bisecting cumulative weights: scalar draws are the simulator's hot loop)."""
    key = tuple(options.items())
    table = _CUMULATIVE.get(key)
    if table is None:
        total = float(sum(options.values()))
        running, cumulative = 0.0, []
        for weight in options.values():
            running += weight / total
            cumulative.append(running)
        table = _CUMULATIVE[key] = (list(options), cumulative)
    names, cumulative = table
    return names[min(bisect.bisect_right(cumulative, rng.random()), len(names) - 1)]


def generate(n: int, seed: int, *, enrolled_from: datetime, prefix: str = "SIM") -> Cohort:
    rng = np.random.default_rng(seed)
    people: list[dict[str, Any]] = []
    for i in range(n):
        gender = _choice(rng, {"woman": 0.47, "man": 0.50, "another": 0.03})
        groups_by_gender = ({"aa_12step": 0.25, "smart": 0.30, "lifering": 0.17, "wfs": 0.23, "other": 0.03,
                             "none": 0.02} if gender == "woman" else
                            {"aa_12step": 0.38, "smart": 0.37, "lifering": 0.20, "other": 0.03, "none": 0.02})
        primary = _choice(rng, groups_by_gender)
        groups = [] if primary == "none" else [primary]
        if rng.random() < (0.35 if primary != "none" else 0.3):
            extra = _choice(rng, {"aa_12step": 1, "smart": 1, "lifering": 1, "other": 0.3,
                                  **({"wfs": 1.0} if gender == "woman" else {})})
            if extra not in groups:
                groups.append(extra)
        aud_p = rng.beta(4, 3)
        se_base = rng.normal(3.5, 0.6)
        p: dict[str, Any] = {
            "i": i, "gender": gender, "age": _clip(round(rng.normal(46, 12)), 18, 85),
            "race": _choice(rng, {"white": 0.80, "black": 0.07, "asian": 0.03, "american_indian": 0.02,
                                  "pacific_islander": 0.01, "multiracial": 0.04, "other": 0.03}),
            "hispanic": bool(rng.random() < 0.08),
            "marital_status": _choice(rng, {"married_partnered": 0.45, "never_married": 0.25,
                                            "divorced_separated_widowed": 0.30}),
            "education": _choice(rng, {"high_school_or_less": 0.15, "some_college": 0.30, "bachelors": 0.30,
                                       "graduate": 0.25}),
            "employment": _choice(rng, {"full_time": 0.45, "part_time": 0.12, "unemployed": 0.12, "retired": 0.15,
                                        "disabled": 0.07, "student": 0.04, "homemaker": 0.05}),
            "income": _choice(rng, {k: 1 for k in ("under_20k", "20k_40k", "40k_60k", "60k_80k", "80k_100k",
                                                   "100k_plus")}),
            "urbanicity": _choice(rng, {"urban": 0.4, "suburban": 0.4, "rural": 0.2}),
            "recovery_goal": _choice(rng, {"abstinence_forever": 0.70, "drink_after_abstinence": 0.15,
                                           "drink_occasionally": 0.15}),
            "aud": [bool(rng.random() < aud_p) for _ in range(11)],
            "se": [_clip(round(se_base + rng.normal(0, 0.6)), 1, 5) for _ in range(12)],
            "primary_group": primary, "groups_30d": sorted(groups),
            "meetings_30d": int(rng.poisson(8) + 1) if groups else int(rng.poisson(0.4)),
            "enrolled_at": enrolled_from + timedelta(days=float(rng.uniform(0, 90))),
        }
        people.append(p)

    # Baseline abstinence (online has no effect at baseline), then the answers it implies.
    latent = rng.standard_normal(n)
    for p in people:
        p["woman"] = float(p["gender"] == "woman")
        p["aud_severity"] = float(sum(p["aud"]))
        p["z"] = [np.sqrt(LATENT_CORRELATION) * latent[p["i"]] + np.sqrt(1 - LATENT_CORRELATION) * rng.standard_normal()
                  for _ in range(3)]
        p["abstinent"] = {"baseline": _abstinent(p, "baseline", 0.0)}
        p["alcohol_last_use"], p["drug_last_use"] = _use(rng, p["abstinent"]["baseline"])

    # Online attendance from the contract's Logit, with the intercept tuned to ~36 % online.
    x = np.array([[_predictor(p, name) for name in ONLINE_EFFECTS] for p in people])
    beta = np.array(list(ONLINE_EFFECTS.values()))
    linear = x @ beta
    intercept = float(brentq(lambda b: float(np.mean(expit(b + linear))) - TARGET_ONLINE, -20, 20))
    online = rng.random(n) < expit(intercept + linear)
    for p, is_online in zip(people, online, strict=True):
        p["online"] = float(is_online)
        p["abstinent"]["month6"] = _abstinent(p, "month6", p["online"])
        p["abstinent"]["month12"] = _abstinent(p, "month12", p["online"])

    roster, responses = [], []
    for p in people:
        ext = f"{prefix}{p['i']:06d}"
        contact = ContactIn(email=f"{ext.lower()}@example.org", name=f"Participant {p['i']}")
        roster.append(ParticipantIn(external_id=ext, enrolled_at=p["enrolled_at"], contact=contact))
        for wave, (open_day, close_day) in (("baseline", (0, 30)), ("month6", (168, 228)), ("month12", (351, 411))):
            if wave in RESPONSE_RATES and rng.random() >= RESPONSE_RATES[wave]:
                continue
            day = rng.uniform(open_day + 0.5, close_day + (4 if rng.random() < 0.05 else 0.5))
            responses.append(NewResponse(external_id=ext, wave=wave, answers=_answers(rng, p, wave),
                                         completed_at=p["enrolled_at"] + timedelta(days=float(day))))

    truth: dict[str, Any] = {
        "online_attendance": {"intercept": intercept, **ONLINE_EFFECTS},
        "abstinence": dict(ABSTINENCE_EFFECTS),
        "abstinence_model2": {**ABSTINENCE_EFFECTS, **dict.fromkeys(GROUP_TERMS, 0.0), "multiple_groups": 0.0},
        "latent_correlation": LATENT_CORRELATION, "response_rates": RESPONSE_RATES,
        "online_share": float(online.mean()), "seed": seed, "participants": n,
    }
    assert list(truth["abstinence"]) == ["intercept", *MODEL1_TERMS]
    assert list(truth["online_attendance"]) == ["intercept", *ONLINE_PREDICTORS, *GROUP_TERMS]
    return Cohort(roster, responses, truth)


def _clip(value: float, low: int, high: int) -> int:
    return int(min(max(value, low), high))


def _phi(z: float) -> float:
    """The standard normal CDF (scalar, without scipy's per-call overhead)."""
    return 0.5 * math.erfc(-z / math.sqrt(2.0))


def _predictor(p: dict[str, Any], name: str) -> float:
    values = {
        "woman": p["woman"], "age": float(p["age"]), "white": float(p["race"] == "white"),
        "hispanic": float(p["hispanic"]), "married": float(p["marital_status"] == "married_partnered"),
        "college": float(p["education"] in ("bachelors", "graduate")),
        "employed": float(p["employment"] in ("full_time", "part_time")),
        "alcohol_recent": float(p["alcohol_last_use"] == "within_30d"),
        "drug_recent": float(p["drug_last_use"] in ("within_30d", "30d_to_1y")),
        "aud_severity": p["aud_severity"], "self_efficacy_score": sum(p["se"]) / len(p["se"]),
        "multiple_groups": float(len(p["groups_30d"]) >= 2),
        "goal_abstinence": float(p["recovery_goal"] == "abstinence_forever"),
        "primary_group[smart]": float(p["primary_group"] == "smart"),
        "primary_group[lifering]": float(p["primary_group"] == "lifering"),
        "primary_group[wfs]": float(p["primary_group"] == "wfs"),
    }
    return float(values[name])


def _abstinent(p: dict[str, Any], wave: str, online: float) -> bool:
    b = ABSTINENCE_EFFECTS
    eta = (b["intercept"] + b["woman"] * p["woman"] + b["age"] * p["age"] + b["aud_severity"] * p["aud_severity"])
    if wave != "baseline":
        eta += b[f"wave[{wave}]"] + b[f"online:wave[{wave}]"] * online
    index = {"baseline": 0, "month6": 1, "month12": 2}[wave]
    # Gaussian copula: the draw is correlated across waves, its marginal probability is exactly expit(eta).
    return bool(_phi(p["z"][index]) < 1.0 / (1.0 + math.exp(-eta)))


def _use(rng: np.random.Generator, abstinent: bool) -> tuple[str, str]:
    if abstinent:
        return (_choice(rng, {"30d_to_1y": 0.3, "over_1y": 0.7}),
                _choice(rng, {"30d_to_1y": 0.08, "1y_to_5y": 0.15, "over_5y": 0.2, "never": 0.57}))
    if rng.random() < 0.85:
        return "within_30d", _choice(rng, {"within_30d": 0.2, "30d_to_1y": 0.1, "1y_to_5y": 0.15, "never": 0.55})
    return _choice(rng, {"30d_to_1y": 0.5, "over_1y": 0.5}), "within_30d"


def _answers(rng: np.random.Generator, p: dict[str, Any], wave: str) -> dict[str, Any]:
    if wave == "baseline":
        alcohol, drug = p["alcohol_last_use"], p["drug_last_use"]
        online, meetings, groups, primary = p["online"], p["meetings_30d"], p["groups_30d"], p["primary_group"]
    else:
        alcohol, drug = _use(rng, p["abstinent"][wave])
        online = float(rng.random() < 0.35)
        groups, primary = p["groups_30d"], p["primary_group"]
        meetings = int(rng.poisson(6)) if groups else int(rng.poisson(0.3))
    meetings = max(meetings, 1) if online else meetings
    answers: dict[str, Any] = {
        "alcohol_last_use": alcohol, "drug_last_use": drug,
        "recovery_goal": p["recovery_goal"] if wave == "baseline" else _choice(
            rng, {"abstinence_forever": 0.7, "drink_after_abstinence": 0.15, "drink_occasionally": 0.15}),
        **{f"se_{k + 1}": (v if wave == "baseline" else _clip(v + int(rng.integers(-1, 2)), 1, 5))
           for k, v in enumerate(p["se"])},
        "meetings_30d": meetings, "online_meetings_30d": int(rng.integers(1, meetings + 1)) if online else 0,
        "groups_30d": groups, "primary_group": primary,
    }
    if primary != "none":
        answers.update(home_group=bool(rng.random() < 0.6), has_sponsor=bool(rng.random() < 0.5),
                       service_30d=bool(rng.random() < 0.3), program_work_30d=bool(rng.random() < 0.6),
                       satisfaction=int(rng.integers(2, 6)),
                       **{f"cohesion_{k}": int(rng.integers(2, 6)) for k in range(1, 7)})
    if wave == "baseline":
        answers.update(
            gender=p["gender"], age=p["age"], race=p["race"], hispanic=p["hispanic"],
            marital_status=p["marital_status"], education=p["education"], employment=p["employment"],
            income=p["income"], urbanicity=p["urbanicity"], online_ever=bool(online or rng.random() < 0.45),
            **{f"aud_{k + 1}": v for k, v in enumerate(p["aud"])},
        )
    return answers


def write(session: Session, ctx: StudyContext, cohort: Cohort, sealer: Sealer, now: datetime,
          actor: uuid.UUID | None = None) -> dict[str, int]:
    """Enrol and answer through the service layer (the same validation as the API)."""
    rows = [participants.ImportRow(i + 1, p) for i, p in enumerate(cohort.participants)]
    result = participants.import_rows(session, ctx, rows, [], partial=False, sealer=sealer, now=now)
    if result.errors:
        raise Invalid(f"the simulated roster was refused: {result.errors[0].message}")
    problems = submit_many(session, ctx, cohort.responses, actor, now)
    if problems:
        raise Invalid(f"simulated answers were refused: {problems[0]}", errors=problems[:20])
    return {"participants": result.created, "responses": len(cohort.responses)}


def truth_path(data_dir: Path, study_key: str, seed: int) -> Path:
    return data_dir / "simulations" / f"{study_key}-seed{seed}.json"


def save_truth(data_dir: Path, study_key: str, truth: dict[str, Any]) -> Path:
    path = truth_path(data_dir, study_key, int(truth["seed"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(truth, indent=2))
    return path


def default_start(now: datetime | None = None) -> datetime:
    """Enrolment spread over 90 days ending 15 months ago: every window has closed."""
    return (now or datetime.now(UTC)) - timedelta(days=90 + 460)
