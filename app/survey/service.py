"""The participant's survey behind a link: pages generated from the codebook, saved through responses.

Each page is one instrument of the wave, in codebook order, with only the items asked at that
wave. A page is saved on "Next" through `responses.service.submit` (the path of POST /responses:
validation, merging, derived variables, audit) as a partial response that completes that
page's instrument; the last instrument completes the response. Writes are attributed to the link.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo

from sqlalchemy.orm import Session

from app.core.errors import AlreadyComplete, Conflict, NotFound
from app.core.security import Principal
from app.instruments.codebook import Codebook, ConditionDoc
from app.participants.models import Participant
from app.participants.repository import schedules_of
from app.reminders.links import LinkExpired, LinkInvalid, LinkTarget, read_token
from app.responses import repository as responses_repo
from app.responses import service as responses
from app.responses.models import Response
from app.responses.schemas import ResponseIn
from app.responses.validation import condition_holds, instrument_states
from app.studies import service as studies
from app.studies.models import Study
from app.studies.service import StudyContext


class LinkUnknown(Exception):
    """Not a link this service issued, or its participant is gone: nothing is revealed."""


class SurveyClosed(Exception):
    """The link no longer takes answers (410); says why, and nothing about the participant."""

    def __init__(self, reason: Literal["complete", "withdrawn", "window"], closed_on: date | None = None,
                 study: Study | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.closed_on = closed_on
        self.study = study


def link_actor(target: LinkTarget) -> str:
    """The audit actor of writes made through a link (the audit trail keeps 64 characters)."""
    return f"link:{target.link_id}"


def csrf_value(secret: str, token: str) -> str:
    """A form value bound to the link: a page's form only works with the link it came from."""
    return hmac.new(secret.encode(), b"survey-csrf:" + token.encode(), hashlib.sha256).hexdigest()[:32]


def csrf_matches(secret: str, token: str, value: str) -> bool:
    return hmac.compare_digest(csrf_value(secret, token).encode(), value.encode())


def read_link(secrets: list[str], token: str, now: datetime) -> tuple[LinkTarget, bool]:
    """The link's target and whether its window has closed; LinkUnknown for anything else."""
    try:
        return read_token(secrets, token, now), False
    except LinkExpired as exc:
        return exc.target, True
    except LinkInvalid:
        raise LinkUnknown from None


@dataclass
class Choice:
    code: str
    label: str


@dataclass
class Question:
    code: str
    type: str
    label: str
    required: bool
    options: list[Choice] = field(default_factory=list)
    min: float | None = None
    max: float | None = None
    max_length: int | None = None
    description: str | None = None
    enable_when: ConditionDoc | None = None
    condition_text: str | None = None


@dataclass
class Page:
    number: int
    instrument: str
    label: str
    questions: list[Question]


@dataclass
class Survey:
    token: str
    target: LinkTarget
    ctx: StudyContext
    codebook: Codebook
    participant: Participant
    wave_label: str
    language: str
    pages: list[Page]
    response: Response | None
    closes_at: datetime

    @property
    def answers(self) -> dict[str, Any]:
        return dict(self.response.answers) if self.response is not None else {}

    @property
    def states(self) -> dict[str, str]:
        r = self.response
        if r is None:
            return dict.fromkeys((p.instrument for p in self.pages), "not_started")
        return instrument_states(self.codebook, r.wave, r.answers, r.completed_instruments or {}, r.status)

    def first_unfinished(self) -> int:
        states = self.states
        return next((p.number for p in self.pages if states.get(p.instrument) != "complete"), len(self.pages))

    def page(self, number: int) -> Page:
        return self.pages[min(max(number, 1), len(self.pages)) - 1]

    @property
    def study_name(self) -> str:
        return self.ctx.study.name

    @property
    def contact(self) -> str | None:
        value = (self.ctx.study.settings or {}).get("contact")
        return str(value) if value else None


def _label(doc: Mapping[str, Any], language: str) -> str:
    labels = doc.get("labels") or {}
    return str(labels.get(language) or doc["label"])


def _condition_text(cond: ConditionDoc, by_code: Mapping[str, Mapping[str, Any]], language: str,
                    words: Mapping[str, str]) -> str:
    """A reader's version of an enable_when, shown beside the item when scripts are off."""
    target = by_code.get(cond.item, {})
    options = {o["code"]: _label(o, language) for o in target.get("options") or []}

    def show(v: Any) -> str:
        if isinstance(v, bool):
            return words["yes"] if v else words["no"]
        return f"“{options.get(str(v), str(v))}”"

    values = cond.value if isinstance(cond.value, list) else [cond.value]
    shown = ", ".join(show(v) for v in values)
    question = f"“{_label(target, language)}”" if target else cond.item
    op = {"in": words["is"], "==": words["is"], "not_in": words["is_not"], "!=": words["is_not"]}.get(cond.operator)
    if cond.operator == "exists":
        return words["if_answered"].format(question=question)
    return words["if"].format(question=question, op=op or cond.operator, value=shown)


def build_pages(codebook: Codebook, wave: str, language: str, words: Mapping[str, str]) -> list[Page]:
    by_code = {it["code"]: it for inst in codebook.document["instruments"] for it in inst["items"]}
    pages: list[Page] = []
    for inst in codebook.document["instruments"]:
        questions = []
        for it in inst["items"]:
            if wave not in it["waves"]:
                continue
            compiled = codebook.items[it["code"]]
            questions.append(Question(
                code=it["code"], type=it["type"], label=_label(it, language), required=bool(it.get("required")),
                options=[Choice(o["code"], _label(o, language)) for o in it.get("options") or []],
                min=it.get("min"), max=it.get("max"), max_length=it.get("max_length"),
                description=it.get("description"), enable_when=compiled.enable_when,
                condition_text=_condition_text(compiled.enable_when, by_code, language, words)
                if compiled.enable_when is not None else None,
            ))
        if questions:
            pages.append(Page(len(pages) + 1, inst["key"], _label(inst, language), questions))
    return pages


def open_survey(session: Session, secrets: list[str], token: str, now: datetime,
                words_for: Callable[[str], Mapping[str, str]]) -> Survey:
    """The survey of a link that still works; LinkUnknown (404) or SurveyClosed (410) otherwise."""
    target, expired = read_link(secrets, token, now)
    try:
        participant_id = uuid.UUID(target.participant_id)
    except ValueError:
        raise LinkUnknown from None
    try:
        ctx = studies.system_context(session, target.study_key)
    except NotFound:
        raise LinkUnknown from None
    participant = session.get(Participant, participant_id)
    codebook = ctx.codebook
    if participant is None or participant.study_id != ctx.study.id or codebook is None \
            or target.wave not in codebook.wave_keys:
        raise LinkUnknown
    schedule = next((s for s in schedules_of(session, [participant.id]).get(participant.id, [])
                     if s.wave == target.wave), None)
    response = responses_repo.for_participant_wave(session, participant.id, target.wave)
    closes_at = min(target.expires_at, schedule.closes_at) if schedule is not None else target.expires_at
    if participant.status == "withdrawn":
        raise SurveyClosed("withdrawn", study=ctx.study)
    if response is not None and response.status == "complete":
        raise SurveyClosed("complete", study=ctx.study)
    if expired or now >= closes_at:
        zone = ZoneInfo(participant.timezone)
        raise SurveyClosed("window", (closes_at - timedelta(seconds=1)).astimezone(zone).date(), study=ctx.study)
    language = participant.language or studies.survey_language(ctx.study)
    wave_label = next((str(w["label"]) for w in codebook.waves() if w["key"] == target.wave), target.wave)
    return Survey(token=token, target=target, ctx=ctx, codebook=codebook, participant=participant,
                  wave_label=wave_label, language=language,
                  pages=build_pages(codebook, target.wave, language, words_for(language)),
                  response=response, closes_at=closes_at)


# -- a page's form -------------------------------------------------------------------------------


def _typed(question: Question, raw: str) -> Any:
    """The answer a form value stands for; a value that is not one is passed on for the validator to name."""
    text = raw.strip()
    if text == "":
        return None
    if question.type == "integer":
        try:
            return int(text)
        except ValueError:
            return text
    if question.type == "number":
        try:
            number = float(text.replace(",", "."))
        except ValueError:
            return text
        return int(number) if number.is_integer() and "." not in text and "," not in text else number
    if question.type == "boolean":
        return {"true": True, "false": False}.get(text, text)
    return text if question.type != "text" else raw


def read_form(page: Page, form: Mapping[str, list[str]]) -> tuple[dict[str, Any], dict[str, Any], set[str]]:
    """(answers, raw values to show again, items the participant saw) from a page's form fields."""
    answers: dict[str, Any] = {}
    raw: dict[str, Any] = {}
    seen = set(form.get("shown", []))
    for q in page.questions:
        values = form.get(q.code, [])
        if q.type == "multi_choice":
            raw[q.code] = list(values)
            if q.code in seen:
                answers[q.code] = list(dict.fromkeys(values))
            continue
        value = values[-1] if values else ""
        raw[q.code] = value
        typed = _typed(q, value)
        if typed is not None:
            answers[q.code] = typed
    return answers, raw, seen


def visible(question: Question, answers: Mapping[str, Any]) -> bool:
    return question.enable_when is None or condition_holds(question.enable_when, answers) is True


@dataclass
class Saved:
    complete: bool
    revealed: bool = False  # items that now apply were not on the page: show it again


def save_page(session: Session, survey: Survey, page: Page, form: Mapping[str, list[str]],
              now: datetime) -> Saved:
    """Save a page as the API would be asked to (partial, completing the page's instrument).

    Raises `Invalid` with the validator's problems. Answers to items whose condition does not
    hold are not kept (a stored one is cleared), as a respondent who changed their mind expects.
    """
    answers, _, seen = read_form(page, form)
    merged = {**survey.answers, **answers}
    for q in page.questions:
        if q.code in answers and not visible(q, merged):
            del answers[q.code]
    merged = {**survey.answers, **answers}
    for q in page.questions:
        if not visible(q, merged) and survey.answers.get(q.code) is not None:
            answers[q.code] = None
    # With scripts off, answering a question can make others apply that were not on the page:
    # keep what was typed and show the page again with them, before completing the instrument.
    revealed = any(visible(q, merged) and q.code not in seen for q in page.questions)
    body = ResponseIn(external_id=survey.participant.external_id, wave=survey.target.wave, status="partial",
                      answers=answers, complete_instruments=[] if revealed else [page.instrument])
    principal = Principal(token_id=survey.target.link_id, role="collector", study_id=survey.ctx.study.id)
    try:
        result, _ = responses.submit(session, survey.ctx, body, principal, now)
    except AlreadyComplete:
        raise SurveyClosed("complete", study=survey.ctx.study) from None
    except Conflict:
        raise SurveyClosed("withdrawn", study=survey.ctx.study) from None
    return Saved(complete=result.status == "complete", revealed=revealed)
