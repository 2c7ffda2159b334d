"""Answer validation, driven by the codebook itself rather than hand-written item lists."""

from __future__ import annotations

import random
from typing import Any

import pytest

from app.instruments.codebook import parse_codebook
from app.responses.validation import check_answers, compute_derived
from tests.factories import items_at, pal_codebook, valid_answers

DOC = pal_codebook()
CODEBOOK = parse_codebook(DOC)
WAVES = [w["key"] for w in DOC["waves"]]
ALL_ITEMS = [it for inst in DOC["instruments"] for it in inst["items"]]


def codes(errors: list[dict[str, Any]]) -> list[tuple[Any, str]]:
    return [(e["loc"][-1], e["code"]) for e in errors]


def wrong_types(item: dict[str, Any]) -> list[Any]:
    """Values of the wrong JSON type for the item: no silent coercion of any of them."""
    t = item["type"]
    if t == "integer":
        return [str(item.get("min", 1)), 2.5, True, [1], {"v": 1}]
    if t == "number":
        return ["1.5", True, [1.5]]
    if t == "boolean":
        return [1, 0, "true", "yes"]
    if t == "single_choice":
        return [1, True, [item["options"][0]["code"]]]
    if t == "multi_choice":
        return [item["options"][0]["code"], [1], True]
    return [1]


@pytest.mark.parametrize("wave", WAVES)
def test_generated_answers_pass_for_every_wave(wave: str) -> None:
    for seed in range(20):
        answers = valid_answers(wave, random.Random(seed))
        assert check_answers(CODEBOOK, wave, answers, answers, "complete") == []


@pytest.mark.parametrize("item", ALL_ITEMS, ids=lambda it: it["code"])
def test_wrong_types_are_rejected_for_every_item(item: dict[str, Any]) -> None:
    wave = item["waves"][0]
    base = valid_answers(wave, random.Random(1), primary_group="smart")
    for bad in wrong_types(item):
        answers = {**base, item["code"]: bad}
        errors = check_answers(CODEBOOK, wave, answers, answers, "complete")
        assert (item["code"], "type") in codes(errors), (item["code"], bad)
        assert sum(1 for e in errors if e["loc"][-1] == item["code"]) == 1  # one entry per bad item


@pytest.mark.parametrize("item", [it for it in ALL_ITEMS if "min" in it or "max" in it], ids=lambda it: it["code"])
def test_out_of_range_numbers_are_rejected(item: dict[str, Any]) -> None:
    wave = item["waves"][0]
    base = valid_answers(wave, random.Random(2), primary_group="lifering")
    for bad, good in ((item["min"] - 1, item["min"]), (item["max"] + 1, item["max"])):
        answers = {**base, item["code"]: bad}
        assert (item["code"], "range") in codes(check_answers(CODEBOOK, wave, answers, answers, "partial"))
        answers = {**base, item["code"]: good}
        for rule in DOC["rules"]:  # keep the cross-item rules satisfied around the boundary value
            if rule["right"] == item["code"]:
                answers[rule["left"]] = 0
            if rule["left"] == item["code"]:
                answers[rule["right"]] = item["max"]
        assert not [e for e in check_answers(CODEBOOK, wave, answers, answers, "complete")
                    if e["loc"][-1] == item["code"]]


@pytest.mark.parametrize("item", [it for it in ALL_ITEMS if "options" in it], ids=lambda it: it["code"])
def test_unknown_option_codes_are_rejected(item: dict[str, Any]) -> None:
    wave = item["waves"][0]
    base = valid_answers(wave, random.Random(3), primary_group="wfs")
    bad = "not_an_option" if item["type"] == "single_choice" else [item["options"][0]["code"], "not_an_option"]
    answers = {**base, item["code"]: bad}
    assert (item["code"], "option") in codes(check_answers(CODEBOOK, wave, answers, answers, "complete"))


def test_unknown_items_are_rejected() -> None:
    answers = {**valid_answers("baseline", random.Random(4)), "favourite_colour": "blue"}
    assert codes(check_answers(CODEBOOK, "baseline", answers, answers, "complete")) == [
        ("favourite_colour", "unknown_item")]


@pytest.mark.parametrize("wave", WAVES)
def test_items_not_asked_at_the_wave_are_rejected(wave: str) -> None:
    asked = {it["code"] for it in items_at(DOC, wave)}
    others = [it for it in ALL_ITEMS if it["code"] not in asked]
    answers = valid_answers(wave, random.Random(5))
    for item in others:
        value = valid_answers(item["waves"][0], random.Random(5), primary_group="smart")[item["code"]]
        errors = check_answers(CODEBOOK, wave, {**answers, item["code"]: value}, {**answers, item["code"]: value},
                               "complete")
        assert codes(errors) == [(item["code"], "not_in_wave")]
    if wave != "baseline":
        assert others, "the codebook asks some items at baseline only"


@pytest.mark.parametrize("wave", WAVES)
def test_missing_required_items_only_matter_when_complete(wave: str) -> None:
    answers = valid_answers(wave, random.Random(6), primary_group="aa_12step")
    for item in items_at(DOC, wave):
        if not item.get("required") or item["code"] not in answers:
            continue
        rest = {k: v for k, v in answers.items() if k != item["code"]}
        if item["code"] == "meetings_30d":
            rest.pop("online_meetings_30d", None)  # keep the rule out of it
        assert (item["code"], "required") in codes(check_answers(CODEBOOK, wave, rest, rest, "complete"))
        assert check_answers(CODEBOOK, wave, rest, rest, "partial") == []
    optional = [it for it in items_at(DOC, wave) if not it.get("required")]
    for item in optional:
        rest = {k: v for k, v in answers.items() if k != item["code"]}
        assert check_answers(CODEBOOK, wave, rest, rest, "complete") == []


@pytest.mark.parametrize("item", [it for it in ALL_ITEMS if "enable_when" in it], ids=lambda it: it["code"])
def test_items_present_when_their_condition_is_false_are_rejected(item: dict[str, Any]) -> None:
    cond = item["enable_when"]
    controller = next(it for it in ALL_ITEMS if it["code"] == cond["item"])
    wave = item["waves"][0]
    assert cond["operator"] == "not_in", "extend this test for new operators"
    disabling = cond["value"][0]
    enabling = next(o["code"] for o in controller["options"] if o["code"] not in cond["value"])
    answers = valid_answers(wave, random.Random(7), **{cond["item"]: enabling})
    value = answers[item["code"]]
    assert check_answers(CODEBOOK, wave, answers, answers, "complete") == []
    off = valid_answers(wave, random.Random(7), **{cond["item"]: disabling})
    off[item["code"]] = value
    assert codes(check_answers(CODEBOOK, wave, off, off, "complete")) == [(item["code"], "not_enabled")]
    # partial: the controlling item is not answered yet, so the dependent one is kept for now
    alone = {item["code"]: value}
    assert check_answers(CODEBOOK, wave, alone, alone, "partial") == []
    assert (item["code"], "not_enabled") in codes(check_answers(CODEBOOK, wave, alone, alone, "complete"))


def test_cross_item_rules() -> None:
    for rule in DOC["rules"]:
        answers = valid_answers("month6", random.Random(8), **{rule["right"]: 3, rule["left"]: 4})
        assert codes(check_answers(CODEBOOK, "month6", answers, answers, "complete")) == [(rule["left"], "rule")]
        answers[rule["left"]] = 3
        assert check_answers(CODEBOOK, "month6", answers, answers, "complete") == []


def test_partial_merge_checks_the_merged_answers() -> None:
    stored = {"primary_group": "smart", "home_group": True}
    incoming = {"primary_group": "none"}
    merged = {**stored, **incoming}
    assert codes(check_answers(CODEBOOK, "baseline", incoming, merged, "partial")) == [("home_group", "not_enabled")]


def test_derived_variables_follow_the_contract() -> None:
    answers = valid_answers(
        "baseline", random.Random(9), alcohol_last_use="over_1y", drug_last_use="never", meetings_30d=6,
        online_meetings_30d=2, groups_30d=["smart", "aa_12step"], primary_group="smart", home_group=True,
        has_sponsor=False, service_30d=True, program_work_30d=True,
        **{f"cohesion_{i}": i % 5 + 1 for i in range(1, 7)}, **{f"se_{i}": 4 for i in range(1, 13)},
        **{f"aud_{i}": i <= 7 for i in range(1, 12)},
    )
    derived = compute_derived(CODEBOOK, "baseline", answers)
    assert derived == {
        "abstinent_30d": True, "alcohol_abstinent_30d": True, "online_30d": True, "multiple_groups": True,
        "weekly_attendance": True, "involvement_score": 4,
        "cohesion_score": pytest.approx(sum(i % 5 + 1 for i in range(1, 7)) / 6), "self_efficacy_score": 4.0,
        "aud_severity": 7,
    }
    drinking = compute_derived(CODEBOOK, "baseline", {**answers, "alcohol_last_use": "within_30d"})
    assert drinking["abstinent_30d"] is False
    using = compute_derived(CODEBOOK, "baseline", {**answers, "drug_last_use": "within_30d"})
    assert using["abstinent_30d"] is False
    no_group = valid_answers("baseline", random.Random(9), primary_group="none", meetings_30d=2, online_meetings_30d=0,
                             groups_30d=[])
    d = compute_derived(CODEBOOK, "baseline", no_group)
    assert d["involvement_score"] is None and d["cohesion_score"] is None
    assert d["online_30d"] is False and d["multiple_groups"] is False and d["weekly_attendance"] is False


def test_baseline_only_variables_are_carried_to_follow_ups() -> None:
    answers = valid_answers("month6", random.Random(10))
    assert compute_derived(CODEBOOK, "month6", answers, {"aud_severity": 5})["aud_severity"] == 5
    assert compute_derived(CODEBOOK, "month6", answers)["aud_severity"] is None
