from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.core.timeutil import Instant

ModelName = Literal["table1", "online_attendance", "abstinence"]


class AnalysisIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: ModelName
    variant: Literal["model1", "model2"] | None = Field(
        default=None, description="abstinence only: model2 adds primary_group and multiple_groups")
    as_of: Instant | None = Field(
        default=None, description="fit on responses completed at or before this instant (default: all data now)")


class AnalysisQueued(BaseModel):
    id: uuid.UUID
    status: Literal["queued", "running", "succeeded", "failed"]
    model: ModelName
    variant: str | None
    reused: bool = Field(description="true when an identical request on unchanged data already exists")


class AnalysisData(BaseModel):
    n_participants: int
    n_observations: int
    snapshot_sha256: str
    as_of: datetime


class AnalysisOut(BaseModel):
    id: uuid.UUID
    study: str
    model: ModelName
    variant: str | None
    status: Literal["queued", "running", "succeeded", "failed"]
    error: str | None = None
    requested_as_of: datetime | None = None
    data: AnalysisData | None = None
    software: dict[str, str] | None = None
    results: dict[str, Any] | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
