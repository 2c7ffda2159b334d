from __future__ import annotations

import uuid
from typing import Literal

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from app.core.crypto import settings_sealer
from app.core.db import SessionDep
from app.core.deps import SettingsDep
from app.core.pagination import CursorQuery, LimitQuery, Page
from app.core.routing import RoleRoute
from app.core.security import Coordinator, WholeStudy
from app.core.timeutil import utcnow
from app.idempotency.service import IdempotencyDep
from app.studies.deps import StudyFromPath
from app.webhooks import service
from app.webhooks.schemas import DeliveryOut, WebhookCreated, WebhookIn, WebhookOut

router = APIRouter(prefix="/api/v1/studies/{key}/webhooks", tags=["webhooks"], route_class=RoleRoute,
                   dependencies=[WholeStudy])

SIGNING = (
    "Each event is POSTed as JSON `{type, timestamp, data}` (ids and the participant's study pseudonym, never "
    "answers or contact data) with the Standard Webhooks headers `webhook-id` (the same on every attempt: "
    "deduplicate on it), `webhook-timestamp` and `webhook-signature` (`v1,` + base64 HMAC-SHA256 of "
    "`{webhook-id}.{webhook-timestamp}.{body}` keyed with the base64-decoded part of the secret after `whsec_`). "
    "Any 2xx is a success; anything else, a redirect or no answer within the timeout is retried with exponential "
    "backoff for 24 hours, one participant's events in order. A subscription whose every delivery fails for a "
    "day is disabled."
)


@router.post("", status_code=201, response_model=WebhookCreated, summary="Subscribe a receiver to study events",
             description=SIGNING + " The URL must be https to a public address (422 naming `url` otherwise).")
def create_webhook(body: WebhookIn, principal: Coordinator, study: StudyFromPath, session: SessionDep,
                   settings: SettingsDep, idem: IdempotencyDep) -> JSONResponse:
    idem.check(body)
    service.check_url(body.url, allow_loopback=settings.webhooks_allow_loopback)
    created = service.create(session, study, body, principal, settings_sealer(settings))
    return idem.remember(201, created, resource_id=created.id)


@router.get("", response_model=Page[WebhookOut], summary="The study's webhook subscriptions (never their secrets)")
def list_webhooks(principal: Coordinator, study: StudyFromPath, session: SessionDep) -> Page[WebhookOut]:
    return Page(items=service.list_subscriptions(session, study), next_cursor=None)


@router.get("/{webhook_id}", response_model=WebhookOut, summary="One webhook subscription")
def get_webhook(webhook_id: uuid.UUID, principal: Coordinator, study: StudyFromPath, session: SessionDep) -> WebhookOut:
    return service.get(session, study, webhook_id)


@router.delete("/{webhook_id}", status_code=204, summary="Remove a subscription and its delivery log")
def delete_webhook(webhook_id: uuid.UUID, principal: Coordinator, study: StudyFromPath,
                   session: SessionDep) -> Response:
    service.delete(session, study, webhook_id)
    return Response(status_code=204)


@router.get("/{webhook_id}/deliveries", response_model=Page[DeliveryOut],
            summary="The delivery log, newest first: status, attempts, last error, response code")
def list_deliveries(webhook_id: uuid.UUID, principal: Coordinator, study: StudyFromPath, session: SessionDep,
                    status: Literal["pending", "delivering", "succeeded", "failed"] | None = None,
                    limit: LimitQuery = 100, cursor: CursorQuery = None) -> Page[DeliveryOut]:
    return service.list_deliveries(session, study, webhook_id, limit=limit, cursor=cursor, status=status)


@router.post("/{webhook_id}/deliveries/{delivery_id}:redeliver", status_code=202, response_model=DeliveryOut,
             summary="Send a delivery again (same webhook-id); re-enables a disabled subscription")
def redeliver(webhook_id: uuid.UUID, delivery_id: uuid.UUID, principal: Coordinator, study: StudyFromPath,
              session: SessionDep) -> DeliveryOut:
    return service.redeliver(session, study, webhook_id, delivery_id, utcnow())
