from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

EventType = Literal["participant.enrolled", "participant.withdrawn", "response.completed", "response.corrected",
                    "reminder.failed", "analysis.succeeded", "analysis.failed"]


class WebhookIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(max_length=2000, description="https URL of the receiver; no private, loopback or "
                                                   "link-local address (redirects are not followed)")
    events: list[EventType] = Field(min_length=1, max_length=20)
    description: str = Field("", max_length=500)


class WebhookOut(BaseModel):
    id: uuid.UUID
    url: str
    events: list[str]
    description: str
    status: Literal["active", "disabled"]
    disabled_at: datetime | None = None
    disabled_reason: str | None = None
    created_at: datetime


class WebhookCreated(WebhookOut):
    secret: str = Field(description="the Standard Webhooks signing secret (`whsec_<base64>`), shown only here")


class DeliveryOut(BaseModel):
    id: uuid.UUID
    webhook_id: str = Field(description="the `webhook-id` header, the same on every attempt")
    event: str
    status: Literal["pending", "delivering", "succeeded", "failed"]
    attempts: int
    last_error: str | None
    response_code: int | None = Field(description="the receiver's HTTP status at the last attempt")
    next_attempt_at: datetime | None
    last_attempt_at: datetime | None
    delivered_at: datetime | None
    created_at: datetime
    payload: dict[str, object]
