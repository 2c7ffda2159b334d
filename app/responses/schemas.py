from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.core.timeutil import Instant
from app.participants.schemas import EXTERNAL_ID_PATTERN


class ResponseIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    external_id: str = Field(pattern=EXTERNAL_ID_PATTERN)
    wave: str = Field(min_length=1, max_length=63)
    status: Literal["complete", "partial"] = "complete"
    completed_at: Instant | None = Field(
        default=None, description="client-reported completion time; defaults to the time received"
    )
    answers: dict[str, Any] = Field(description="item code -> answer, validated against the codebook for the wave")
    complete_instruments: list[str] = Field(
        default_factory=list, max_length=200,
        description="instruments this submission completes (with status partial): their required items are "
                    "checked now and they are recorded complete; when every instrument asked at the wave is "
                    "complete, the response becomes complete")


InstrumentState = Literal["complete", "partial", "not_started"]
INSTRUMENTS_DESCRIPTION = "each instrument asked at the wave: complete, partial (some answers) or not_started"


class ResponseCreated(BaseModel):
    id: uuid.UUID
    external_id: str
    wave: str
    status: Literal["complete", "partial"]
    received_at: datetime
    completed_at: datetime | None
    late: bool
    derived: dict[str, Any]
    instruments: dict[str, InstrumentState] = Field(description=INSTRUMENTS_DESCRIPTION)


class CorrectionOut(BaseModel):
    at: datetime
    token_id: uuid.UUID
    reason: str
    before: dict[str, Any]
    after: dict[str, Any]


class ResponseOut(BaseModel):
    id: uuid.UUID
    external_id: str | None = Field(description="absent for analysts, who see the pseudonym instead")
    pseudonym: str
    wave: str
    status: Literal["complete", "partial"]
    answers: dict[str, Any]
    derived: dict[str, Any]
    instruments: dict[str, InstrumentState] = Field(description=INSTRUMENTS_DESCRIPTION)
    late: bool
    received_at: datetime
    completed_at: datetime | None
    updated_at: datetime
    codebook_revision: int
    corrections: list[CorrectionOut] = Field(default_factory=list)


class CorrectionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    answers: dict[str, Any] = Field(min_length=1, description="items to change; null removes an answer")
    reason: str = Field(min_length=1, max_length=2000)
