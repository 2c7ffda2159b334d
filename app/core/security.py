"""Bearer tokens and roles.

Tokens are 256-bit random secrets, so a fast SHA-256 is enough to store them safely:
slow password hashes exist for low-entropy secrets, and would cost every request tens of
milliseconds. Only the hash is stored; the secret is shown once, when it is created.
"""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import Depends, Request
from sqlalchemy import Connection
from sqlalchemy.orm import Session

from app.core.admission import run_for_request
from app.core.db import SessionDep, database_of, expect_live_token, remember_actor, transaction
from app.core.errors import Forbidden, Unauthorized

Role = Literal["admin", "coordinator", "collector", "analyst"]
ROLES: tuple[Role, ...] = ("admin", "coordinator", "collector", "analyst")
TOKEN_PREFIX = "coh_"  # noqa: S105 - a prefix, not a secret


def new_secret() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Principal:
    token_id: uuid.UUID
    role: Role
    study_id: uuid.UUID | None
    # A token limited to one site of its study: it sees only that site's participants (and what
    # hangs on them), and nothing that spans the whole study.
    site_id: uuid.UUID | None = None

    def may(self, *roles: Role) -> bool:
        """Admin may do everything; any other role only what is listed."""
        return self.role == "admin" or self.role in roles

    @property
    def scoped(self) -> bool:
        """A token with a study_key: every request it makes stays inside that study (contract section 2)."""
        return self.study_id is not None

    def may_access_study(self, study_id: uuid.UUID | None) -> bool:
        return self.study_id is None or self.study_id == study_id

    def require_study(self, study_id: uuid.UUID | None) -> None:
        """The one scope check: a scoped token acting on another study (or on none) is refused."""
        if not self.may_access_study(study_id):
            raise Forbidden("this token is limited to one study and may not act outside it")

    def require_unscoped(self, what: str) -> None:
        if self.scoped:
            raise Forbidden(f"a token limited to one study may not {what}")

    @property
    def sited(self) -> bool:
        return self.site_id is not None

    def require_whole_study(self, what: str) -> None:
        """Refuse a site-scoped token what spans every site (study settings, audit, models, webhooks)."""
        if self.sited:
            raise Forbidden(f"a token limited to one site may not {what}")


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization")
    if not header:
        raise Unauthorized("missing Authorization: Bearer <token> header")
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise Unauthorized("the Authorization header must be 'Bearer <token>'")
    return secret.strip()


PrincipalLookup = Callable[[Session, str], Any]
"""(session, secret digest) -> a row with id, role, study_id and site_id, or None. The tokens domain owns
the table and provides it; the application hands it to this layer (`app.state.principal_lookup`),
so the plumbing does not import a domain."""


TokenCheck = Callable[[Connection, uuid.UUID], bool]
"""(connection, token id) -> whether the token is still live; it also names the token as the
transaction's actor for the audit triggers. Provided by the tokens domain (`app.state.token_check`)."""


def _unknown() -> Unauthorized:
    return Unauthorized("the token is unknown or revoked")


class KnownTokens:
    """Secret digests this process has looked up, with their principal (a token's role and study never change).

    What may change is revocation, and it takes effect at once: a known token is confirmed live by
    the first statement of each of the request's transactions, the one that also names the token as
    the audit actor (so the confirmation costs no round trip of its own). What the cache saves is the
    lookup before the request's work, and with it a thread hop and a connection held across hops.
    """

    def __init__(self, size: int = 4096, ttl_seconds: float = 300.0) -> None:
        self.size = size
        self.ttl = ttl_seconds
        self._known: OrderedDict[str, tuple[Principal, float]] = OrderedDict()

    def get(self, digest: str) -> Principal | None:
        hit = self._known.get(digest)
        if hit is None or hit[1] < time.monotonic():
            return None
        return hit[0]

    def put(self, digest: str, principal: Principal) -> None:
        self._known[digest] = (principal, time.monotonic() + self.ttl)
        self._known.move_to_end(digest)
        while len(self._known) > self.size:
            self._known.popitem(last=False)


def _principal_of(row: Any) -> Principal:
    return Principal(token_id=row.id, role=row.role, study_id=row.study_id, site_id=row.site_id)


def authenticate_now(request: Request, session: Session) -> Principal:
    """The token looked up in `session`'s transaction (for code already inside one)."""
    lookup: PrincipalLookup = request.app.state.principal_lookup
    row = lookup(session, hash_secret(_bearer(request)))
    if row is None:
        raise _unknown()
    principal = _principal_of(row)
    request.state.principal = principal
    remember_actor(session, str(principal.token_id))
    return principal


def _look_up(request: Request, digest: str) -> Principal:
    """A token this process does not know yet, in a short transaction of its own."""
    lookup: PrincipalLookup = request.app.state.principal_lookup
    with transaction(database_of(request)) as session:
        row = lookup(session, digest)
    if row is None:
        raise _unknown()
    return _principal_of(row)


async def authenticate(request: Request, session: SessionDep) -> Principal:
    """The request's principal; no database work here when the token is known (see KnownTokens).

    The request's session confirms the token at the start of its transaction and refuses a revoked one.
    """
    digest = hash_secret(_bearer(request))
    known: KnownTokens = request.app.state.known_tokens
    principal = known.get(digest)
    if principal is None:
        # a request waiting for a group holds no place of its own: the lookup takes one
        principal = await run_for_request(request, lambda: _look_up(request, digest))
        known.put(digest, principal)
    request.state.principal = principal
    expect_live_token(session, principal.token_id, request.app.state.token_check,
                      request.app.state.token_check_column, _unknown)
    return principal


CurrentPrincipal = Annotated[Principal, Depends(authenticate)]


def admit(principal: Principal, *roles: Role) -> Principal:
    """The role check of `require(*roles)`, for a handler that authenticates without FastAPI's dependencies."""
    if not principal.may(*roles):
        allowed = ", ".join(sorted({"admin", *roles}))
        raise Forbidden(f"the {principal.role} role may not do this (allowed: {allowed})")
    return principal


def require(*roles: Role) -> Callable[[Principal], Coroutine[Any, Any, Principal]]:
    """A dependency admitting the given roles (admin is always admitted).

    The roles are attached to the function, and `RoleRoute` copies them into the OpenAPI
    document as `x-roles`, so the published matrix is the one that is enforced.
    """
    allowed = frozenset(("admin", *roles))

    async def check(principal: CurrentPrincipal) -> Principal:  # no I/O, so no thread hop
        return admit(principal, *roles)

    check.cohort_roles = tuple(sorted(allowed))  # type: ignore[attr-defined]
    return check


async def whole_study(principal: CurrentPrincipal) -> Principal:
    """For routes whose data spans every site of a study: a site-scoped token is refused (403)."""
    principal.require_whole_study("do this: it spans every site of the study")
    return principal


whole_study.cohort_whole_study = True  # type: ignore[attr-defined]

WholeStudy = Depends(whole_study)
"""Add as `dependencies=[WholeStudy]` to a route (or router) that cannot be limited to one site."""

AdminOnly = Annotated[Principal, Depends(require())]
Coordinator = Annotated[Principal, Depends(require("coordinator"))]
AnyRole = Annotated[Principal, Depends(require("coordinator", "collector", "analyst"))]
Reader = Annotated[Principal, Depends(require("coordinator", "analyst"))]
COLLECTING_ROLES: tuple[Role, ...] = ("coordinator", "collector")
Collector = Annotated[Principal, Depends(require(*COLLECTING_ROLES))]
Analyst = Annotated[Principal, Depends(require("analyst"))]
AnalystOrCoordinator = Reader
