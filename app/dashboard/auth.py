"""Signing in to the dashboard with an API token.

The browser never keeps the token's secret: signing in checks it once, records a session row
and stores a signed, timed cookie naming that session and its token (HttpOnly, SameSite=Strict,
Secure under HTTPS). Each page looks both up again, so signing out (which ends the session row)
and revoking the token each end the session at once, for every copy of the cookie.
Forms carry a CSRF value that lives inside the signed cookie and is compared in constant time.
"""

from __future__ import annotations

import hmac
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated

from fastapi import Depends, Form, Request
from itsdangerous import BadSignature, URLSafeTimedSerializer
from sqlalchemy.orm import Session

from app.core.crypto import all_secrets
from app.core.db import SessionDep, remember_actor
from app.core.security import Principal, Role, hash_secret
from app.core.settings import Settings
from app.dashboard import repository
from app.tokens import repository as tokens

COOKIE = "cohort_session"
SALT = "cohort.dashboard-session"
MAX_AGE = 12 * 3600  # a working day; then sign in again


class SignInRequired(Exception):
    """No valid session: the page redirects to the sign-in form."""


class NotAllowed(Exception):
    """The signed-in role may not see this page."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


@dataclass(frozen=True)
class Viewer:
    principal: Principal
    csrf: str
    session_id: uuid.UUID

    @property
    def role(self) -> Role:
        return self.principal.role

    def may(self, *roles: Role) -> bool:
        return self.principal.may(*roles)


def _serializer(settings: Settings) -> URLSafeTimedSerializer:
    # signs with the current key, still reads sessions signed before a key rotation
    return URLSafeTimedSerializer(list(reversed(all_secrets(settings))), salt=SALT)


def sign_in(session: Session, settings: Settings, secret: str) -> tuple[str, Principal] | None:
    """The cookie value for a valid token secret, or None."""
    row = tokens.principal_row(session, hash_secret(secret.strip()))
    if row is None:
        return None
    principal = Principal(token_id=row.id, role=row.role, study_id=row.study_id, site_id=row.site_id)
    session_id = repository.start(session, row.id)
    value = _serializer(settings).dumps({"t": str(row.id), "s": str(session_id), "c": secrets.token_urlsafe(24)})
    return str(value), principal


def _cookie(settings: Settings, raw: str) -> dict[str, str] | None:
    try:
        data = _serializer(settings).loads(raw, max_age=MAX_AGE)
        return {"t": str(uuid.UUID(data["t"])), "s": str(uuid.UUID(data["s"])), "c": str(data["c"])}
    except (BadSignature, KeyError, TypeError, ValueError):
        return None


def token_of_cookie(settings: Settings, raw: str) -> str | None:
    """The token id a session cookie names (signature checked, session not looked up): the rate
    limit's key for dashboard forms."""
    data = _cookie(settings, raw)
    return data["t"] if data is not None else None


def viewer_of(request: Request, session: Session, settings: Settings) -> Viewer | None:
    raw = request.cookies.get(COOKIE)
    data = _cookie(settings, raw) if raw else None
    if data is None:
        return None
    row = repository.active_principal(session, uuid.UUID(data["s"]))
    if row is None or str(row.id) != data["t"]:
        return None
    remember_actor(session, str(row.id))
    return Viewer(Principal(token_id=row.id, role=row.role, study_id=row.study_id, site_id=row.site_id), data["c"],
                  uuid.UUID(data["s"]))


def sign_out(session: Session, viewer: Viewer) -> None:
    repository.end(session, viewer.session_id, datetime.now(UTC))


def current_viewer(request: Request, session: SessionDep) -> Viewer:
    viewer = viewer_of(request, session, request.app.state.settings)
    if viewer is None:
        raise SignInRequired
    return viewer


def checked_form(viewer: Annotated[Viewer, Depends(current_viewer)],
                 csrf: Annotated[str, Form(description="the form's CSRF value")] = "") -> Viewer:
    """The viewer of a POSTed form, after its CSRF value matched the session's."""
    if not hmac.compare_digest(csrf.encode(), viewer.csrf.encode()):
        raise NotAllowed("the form has expired or did not come from this dashboard; reload the page and try again")
    return viewer


ViewerDep = Annotated[Viewer, Depends(current_viewer)]
FormViewer = Annotated[Viewer, Depends(checked_form)]
