from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class RunResult(BaseModel):
    now: datetime
    sent: int
    skipped: int = Field(description="not sent: the window closed, or a later message of the wave was due")
    failed: int = Field(description="gave up: no email address, refused, or retries exhausted")
    cancelled: int = Field(description="the wave was completed or the participant withdrew")
    deferred: int = Field(description="due outside 09:00-20:00 local: moved to the next sending hours")
    retried: int = Field(description="delivery failed and a new attempt is planned")
    planned: int = Field(description="windows whose messages were planned in this run")


class SendOut(BaseModel):
    wave: str
    kind: str
    status: Literal["pending", "sent", "failed", "cancelled", "skipped"]
    due_at: datetime
    sent_at: datetime | None
    attempts: int
    last_error: str | None
    planned: bool = Field(description="false for a message computed from the policy, not yet a stored row")


class SendNowIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    wave: str = Field(max_length=63, description="the wave whose window is open")


class SendList(BaseModel):
    items: list[SendOut]


class PolicyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    invite_on_open: bool = True
    reminder_days_after_open: list[int] = Field(default_factory=list, max_length=10)
    final_days_before_close: int | None = Field(default=None, ge=0, le=3650)
    channel: Literal["email"] = "email"


class TemplateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    subject: str = Field(min_length=1, max_length=500)
    body: str = Field(min_length=1, max_length=20_000)


class TemplateOut(TemplateIn):
    variables: list[str]
    customised: bool


class FunnelWave(BaseModel):
    wave: str
    completed: int
    completed_after: dict[str, int] = Field(
        description="completions by the last message sent before them ('none': completed before any)")
    sent: dict[str, int] = Field(description="messages sent, by kind")


class Funnel(BaseModel):
    as_of: datetime
    waves: list[FunnelWave]


class LinkResolved(BaseModel):
    study: str
    external_id: str
    wave: str
    wave_label: str
    expires_at: datetime
