from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field


class AuditOut(BaseModel):
    id: int
    at: datetime
    actor: str | None = Field(description="id of the token whose request made the change; null for the system")
    table: str
    row_id: str
    action: str = Field(description="INSERT, UPDATE or DELETE")
    changed: list[str] | None = Field(description="columns an UPDATE changed")
    before: dict[str, Any] | None = Field(description="the row before (contact data shows only as [redacted])")
    after: dict[str, Any] | None
