from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from app.sites.models import SITE_KEY_PATTERN


class SiteIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str = Field(pattern=SITE_KEY_PATTERN, max_length=63, description="unique within the study")
    name: str = Field(min_length=1, max_length=200)
    timezone: str | None = Field(default=None, max_length=64,
                                 description="IANA zone: its participants' default (else the study's)")


class SiteOut(BaseModel):
    id: uuid.UUID
    key: str
    name: str
    timezone: str | None = None
    created_at: datetime


class SiteList(BaseModel):
    items: list[SiteOut]
