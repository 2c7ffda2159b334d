from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from app.core.security import Role


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Role
    label: str = Field(min_length=1, max_length=200)
    study_key: str | None = Field(default=None, description="restrict the token to one study")
    site_key: str | None = Field(
        default=None, max_length=63,
        description="restrict a coordinator, collector or analyst token of `study_key` to one of its sites")
    format: Literal["cohort", "redcap"] = Field(
        default="cohort", description="`redcap`: a 32-character token for the REDCap-compatible API at "
                                      "/redcap/api/ (needs `study_key`: the study is the REDCap project)")


class TokenOut(BaseModel):
    id: uuid.UUID
    role: Role
    label: str
    study_key: str | None = None
    site_key: str | None = None
    created_at: datetime
    revoked_at: datetime | None = None


class TokenCreated(TokenOut):
    token: str = Field(description="the secret; shown only in this response")
