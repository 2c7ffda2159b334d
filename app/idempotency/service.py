"""The Idempotency-Key header (IETF httpapi draft) on every creating POST.

Same key and same body: the stored status and body are returned again. Same key with a
different body: 422. Same key while the first request is still running: 409 (the first
holds a transaction-scoped advisory lock on the key until it commits or rolls back).
Keys are kept 24 hours.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import Depends, Header, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.orm import Session
from sqlalchemy.sql.expression import Executable
from starlette.datastructures import URL
from starlette.types import Scope

from app.core.crypto import Sealer, settings_sealer
from app.core.db import SessionDep
from app.core.deps import SettingsDep
from app.core.errors import InFlight, Invalid
from app.core.security import CurrentPrincipal, Principal
from app.core.timeutil import utcnow
from app.idempotency import repository

RETENTION = timedelta(hours=24)
REPLAY_HEADER = "Idempotent-Replayed"


class Replay(Exception):
    def __init__(self, status_code: int, body: Any) -> None:
        self.status_code = status_code
        self.body = body


def _jsonable(value: Any) -> Any:
    """jsonable_encoder's result; for a Pydantic model its JSON-mode dump, without walking it again."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", by_alias=True)
    return jsonable_encoder(value)


def fingerprint(method: str, path: str, payload: Any) -> str:
    canonical = payload if isinstance(payload, bytes) else json.dumps(
        _jsonable(payload), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode()
    return hashlib.sha256(method.encode() + b" " + path.encode() + b"\n" + canonical).hexdigest()


def _lock_id(token_id: str, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{token_id}\0{key}".encode()).digest()[:8], "big", signed=True)


class Idempotency:
    def __init__(self, session: Session, principal: Principal, key: str | None, sealer: Sealer,
                 method: str, path: str, now: datetime) -> None:
        self.session = session
        self.principal = principal
        self.key = key
        self.sealer = sealer
        self.method = method
        self.path = path
        self.now = now
        self._fingerprint: str | None = None

    def on(self, session: Session) -> Idempotency:
        """The same request's key, checked and remembered in `session` (a transaction shared with others)."""
        return Idempotency(session, self.principal, self.key, self.sealer, self.method, self.path, self.now)

    def check(self, payload: Any) -> None:
        """Call first thing in the handler: replays (raises Replay), refuses (409/422) or lets it run."""
        read = self.claim_read(payload)
        if read is not None:
            self.settle(self.session.connection().execute(read[0], read[1]).one())

    def claim_read(self, payload: Any) -> tuple[Executable, dict[str, Any]] | None:
        """`check` in two halves, for a handler that sends its first reads together: the claim of the
        key as a read (None without a key), then `settle` with its one row."""
        if self.key is None:
            return None
        self._fingerprint = fingerprint(self.method, self.path, payload)
        return repository.claim_read(_lock_id(str(self.principal.token_id), self.key), self.principal.token_id,
                                     self.key)

    def settle(self, record: Any) -> None:
        """The claim's row (locked, record_id, fingerprint, status_code, sealed_body, created_at)."""
        locked, record_id, stored_fingerprint, status_code, sealed_body, created_at = record
        if not locked:
            raise InFlight("a request with this Idempotency-Key is still in flight; retry when it has finished")
        if record_id is not None and created_at < self.now - RETENTION:
            repository.drop(self.session, record_id)
            return
        if record_id is None:
            return
        if stored_fingerprint != self._fingerprint:
            raise Invalid(
                "this Idempotency-Key was used with a different request",
                errors=[{"loc": ["header", "Idempotency-Key"], "code": "idempotency_key_reused",
                         "message": "use a new key for a different request"}],
            )
        raise Replay(status_code, self.sealer.open(sealed_body)["body"])

    def remember(self, status_code: int, body: BaseModel | dict[str, Any] | list[Any],
                 headers: dict[str, str] | None = None, resource_id: uuid.UUID | None = None) -> JSONResponse:
        content = _jsonable(body)
        if self.key is not None:
            assert self._fingerprint is not None, "check() must run before remember()"
            repository.store(self.session, {
                "id": uuid.uuid4(), "token_id": self.principal.token_id, "key": self.key, "method": self.method,
                "path": self.path, "fingerprint": self._fingerprint, "status_code": status_code,
                "sealed_body": self.sealer.seal({"body": content}), "created_at": self.now,
                "resource_id": resource_id})
        return JSONResponse(content, status_code=status_code, headers=headers)


async def idempotency(  # no I/O here: the checks run in the handler's thread
    request: Request,
    session: SessionDep,
    principal: CurrentPrincipal,
    settings: SettingsDep,
    idempotency_key: Annotated[
        str | None,
        Header(alias="Idempotency-Key", min_length=1, max_length=255,
               description="retry-safe creation: the same key and body return the stored response"),
    ] = None,
) -> Idempotency:
    return Idempotency(session, principal, idempotency_key, settings_sealer(settings), request.method,
                       _url_path(request.scope), utcnow())


def _url_path(scope: Scope) -> str:
    """`request.url.path` without building the whole URL (most of the guards' cost on a hot route) for a
    path of printable characters that the URL leaves as they are; any other is left to the URL."""
    path: str = scope["path"]
    if path.isprintable() and " " not in path and "?" not in path and "#" not in path and "\\" not in path:
        return path
    return URL(scope=scope).path


IdempotencyDep = Annotated[Idempotency, Depends(idempotency)]


async def replay_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Replay)
    return JSONResponse(exc.body, status_code=exc.status_code, headers={REPLAY_HEADER: "true"})


def forget_resource(session: Session, resource_id: uuid.UUID) -> None:
    repository.forget_resource(session, resource_id)


def purge_expired(session: Session, now: datetime) -> int:
    return repository.purge_before(session, now - RETENTION)
