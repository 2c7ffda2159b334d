from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from app.core.timeutil import Instant
from app.studies.schemas import Language

EXTERNAL_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$"
EMAIL_PATTERN = r"^[^@\s]{1,64}@[^@\s]+\.[^@\s]+$"
PHONE_PATTERN = r"^\+?[0-9][0-9 ()./-]{2,29}$"

ParticipantStatus = Literal["active", "withdrawn", "completed", "lost"]
ScheduleStatus = Literal["scheduled", "open", "completed", "missed", "withdrawn"]


class ContactIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: str | None = Field(default=None, max_length=254, pattern=EMAIL_PATTERN)
    phone: str | None = Field(default=None, max_length=30, pattern=PHONE_PATTERN)
    name: str | None = Field(default=None, min_length=1, max_length=200)


class ParticipantIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    external_id: str = Field(pattern=EXTERNAL_ID_PATTERN, description="the study's own id; unique per study")
    enrolled_at: Instant = Field(description="RFC 3339 with offset")
    timezone: str | None = Field(default=None, max_length=64, description="IANA zone; the study's by default")
    language: Language | None = Field(default=None, description="language of the survey pages; the study's by default")
    contact: ContactIn | None = None
    site: str | None = Field(default=None, max_length=63,
                             description="key of the study's site the participant belongs to (a site-scoped "
                                         "token's own site by default)")


class ContactOut(BaseModel):
    email: str | None = None
    phone: str | None = None
    name: str | None = None


class ScheduleOut(BaseModel):
    wave: str
    opens_at: datetime
    due_at: datetime
    closes_at: datetime
    status: ScheduleStatus
    completed_at: datetime | None = None


class ParticipantOut(BaseModel):
    id: uuid.UUID
    external_id: str
    status: ParticipantStatus
    enrolled_at: datetime
    timezone: str
    language: Language | None = None
    withdrawn_at: datetime | None = None
    withdraw_reason: str | None = None
    site: str | None = Field(default=None, description="the key of the participant's site, if any")
    contact: ContactOut | None = None
    schedule: list[ScheduleOut]


class WithdrawIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(min_length=1, max_length=2000)
    erase_contact: bool = False
    withdrawn_at: Instant | None = Field(default=None, description="default: the time of the request")


class SiteMoveIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    site: str | None = Field(max_length=63, description="the key of the new site; null: no site")
    reason: str = Field(min_length=1, max_length=2000, description="why, for the audit trail")


class DateShiftOut(BaseModel):
    external_id: str
    days: int = Field(description="what `?dates=shifted` exports add to each of this participant's dates; "
                                  "subtract it to undo")


class ImportError_(BaseModel):
    row: int = Field(description="1-based position of the record (CSV: data rows after the header)")
    loc: list[str | int]
    code: str
    message: str


class ImportResult(BaseModel):
    created: int
    errors: list[ImportError_]
