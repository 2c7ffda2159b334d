from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.studies.models import STUDY_KEY_PATTERN


class StudyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str = Field(pattern=STUDY_KEY_PATTERN, description="unique, lower-case letters, digits and dashes")
    name: str = Field(min_length=1, max_length=200)
    timezone: str = Field(min_length=1, max_length=64, description="IANA time zone, e.g. America/New_York")
    template: Literal["pal-replication"] | None = Field(
        default=None, description="create the waves and instruments of a shipped codebook"
    )
    codebook: dict[str, Any] | None = Field(
        default=None, description="a codebook document in the pal-v1.json format, instead of a template"
    )


WithdrawalPolicy = Literal["keep_responses", "delete_responses"]
ExportDates = Literal["exact", "shifted", "year"]
Language = Literal["en", "es"]


class StudyUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, min_length=1, max_length=200)
    withdrawal_policy: WithdrawalPolicy | None = Field(
        default=None, description="what happens to a withdrawing participant's answers")
    language: Language | None = Field(
        default=None, description="the language of the participants' survey pages (codebook labels in it when "
                                  "the codebook has them)")
    contact: str | None = Field(
        default=None, max_length=300,
        description="the coordinator's contact line shown on every survey page (e.g. a name and an address)")
    export_dates: ExportDates | None = Field(
        default=None, description="how de-identified exports write dates unless `?dates=` says otherwise: "
                                  "`exact`, `shifted` (per participant, intervals kept) or `year` (years only)")


class CodebookRef(BaseModel):
    key: str
    version: int
    revision: int
    sha256: str


class StudyOut(BaseModel):
    id: uuid.UUID
    key: str
    name: str
    timezone: str
    template: str | None
    codebook: CodebookRef | None
    waves: list[str]
    withdrawal_policy: WithdrawalPolicy = "keep_responses"
    language: Language = "en"
    contact: str | None = None
    export_dates: ExportDates = "exact"
    created_at: datetime


class ReminderPolicy(BaseModel):
    invite_on_open: bool = True
    reminder_days_after_open: list[int] = Field(default_factory=list)
    final_days_before_close: int | None = None
    channel: str = "email"


class WaveOut(BaseModel):
    key: str
    label: str
    offset_days: int
    window_open_days: int
    window_close_days: int
    reminder_policy: ReminderPolicy


class WaveList(BaseModel):
    items: list[WaveOut]


class OptionOut(BaseModel):
    code: str
    label: str
    labels: dict[str, str] | None = Field(default=None, description="translated labels by language")


class ConditionOut(BaseModel):
    item: str
    operator: str
    value: Any = None


class ItemOut(BaseModel):
    code: str
    type: str
    label: str
    labels: dict[str, str] | None = Field(default=None, description="translated labels by language")
    options: list[OptionOut] | None = None
    min: int | float | None = None
    max: int | float | None = None
    required: bool = False
    waves: list[str]
    enable_when: ConditionOut | None = None
    max_length: int | None = None
    description: str | None = None


class InstrumentOut(BaseModel):
    key: str
    label: str
    labels: dict[str, str] | None = Field(default=None, description="translated labels by language")
    waves: list[str]
    items: list[ItemOut]
    description: str | None = None


class InstrumentList(BaseModel):
    items: list[InstrumentOut]
