from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field


class WaveRetention(BaseModel):
    wave: str
    eligible: int = Field(description="window closed by as_of, or completed by then while open; "
                                      "not withdrawn before the window opened")
    completed: int = Field(description="eligible with a complete response at or before as_of")
    rate: float | None = Field(description="completed / eligible")
    open: int
    missed: int
    withdrawn: int
    late: int = Field(description="completed outside the window")


class GroupRetention(BaseModel):
    group: str
    waves: list[WaveRetention]


class Retention(BaseModel):
    as_of: datetime
    waves: list[WaveRetention]
    by: Literal["primary_group", "site"] | None = None
    groups: list[GroupRetention] | None = Field(
        default=None, description="per baseline primary_group or per site key (`none`: no site), with ?by=")


class FollowupItem(BaseModel):
    external_id: str
    participant_status: str
    wave: str
    wave_status: str
    opens_at: datetime
    closes_at: datetime
    completed_at: datetime | None
    last_reminder_at: datetime | None
    last_reminder_kind: str | None
    timezone: str


class FollowupPage(BaseModel):
    items: list[FollowupItem]
    next_cursor: str | None


class OutcomeRow(BaseModel):
    wave: str
    group: str
    n: int = Field(description="complete responses with abstinent_30d known")
    abstinent: int
    rate: float | None
    ci_low: float | None = Field(description="95 % Wilson interval")
    ci_high: float | None


class Outcomes(BaseModel):
    as_of: datetime
    by: Literal["online_30d", "primary_group", "site"]
    items: list[OutcomeRow]
