from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.analysis.plan import ModelDoc, PlanDoc, SpecDoc, VariableDoc
from app.core.timeutil import Instant

KEY = r"^[a-z][a-z0-9_]{0,39}$"


class AnalysisIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(default=None, pattern=KEY, description="a model of the study's analysis plan")
    variant: str | None = Field(default=None, pattern=KEY, description="a variant of that model (e.g. model2)")
    spec: SpecDoc | None = Field(default=None, description=(
        "a one-off model in the plan's format (with optional variables of its own), instead of `model`"))
    as_of: Instant | None = Field(
        default=None, description="fit on responses completed at or before this instant (default: all data now)")


class AnalysisQueued(BaseModel):
    id: uuid.UUID
    status: Literal["queued", "running", "succeeded", "failed"]
    model: str
    variant: str | None
    plan_version: int | None
    reused: bool = Field(description="true when an identical request on unchanged data already exists")


class AnalysisData(BaseModel):
    n_participants: int
    n_observations: int
    snapshot_sha256: str
    as_of: datetime


class AnalysisOut(BaseModel):
    id: uuid.UUID
    study: str
    model: str
    variant: str | None
    plan_version: int | None = Field(default=None, description="the plan version the model came from")
    status: Literal["queued", "running", "succeeded", "failed"]
    error: str | None = None
    requested_as_of: datetime | None = None
    data: AnalysisData | None = None
    software: dict[str, str] | None = None
    results: dict[str, Any] | None = None
    spec: dict[str, Any] | None = Field(default=None, description="the resolved model that was fitted")
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None


class PlanIn(PlanDoc):
    """A new version of the plan. `version`, when given, must be the current one (else 409)."""

    version: int | None = Field(default=None, ge=0, description="the version this edit starts from")
    study: str | None = Field(default=None, description="ignored (read-only, accepted for round trips)")
    created_at: Instant | None = Field(default=None, description="ignored (read-only, accepted for round trips)")


class PlanOut(BaseModel):
    study: str
    version: int = Field(description="0: the study has no plan yet")
    created_at: datetime | None = None
    variables: dict[str, VariableDoc]
    models: dict[str, ModelDoc]
