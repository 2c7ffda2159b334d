from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from app.core.security import Role


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Role
    label: str = Field(min_length=1, max_length=200)
    study_key: str | None = Field(default=None, description="restrict the token to one study")


class TokenOut(BaseModel):
    id: uuid.UUID
    role: Role
    label: str
    study_key: str | None = None
    created_at: datetime
    revoked_at: datetime | None = None


class TokenCreated(TokenOut):
    token: str = Field(description="the secret; shown only in this response")
