"""API tokens: creation (the secret is returned once), revocation and start-up bootstrap."""

from __future__ import annotations

import secrets
import uuid
from datetime import UTC, datetime

from sqlalchemy.orm import Session

from app.core.errors import Forbidden, Invalid, NotFound
from app.core.security import Principal, Role, hash_secret, new_secret
from app.sites import service as sites
from app.studies import repository as studies
from app.tokens import repository
from app.tokens.models import ApiToken
from app.tokens.schemas import TokenCreated, TokenOut


def create(
    session: Session, *, role: Role, label: str, study_key: str | None = None, site_key: str | None = None,
    created_by: Principal | None = None, secret: str | None = None, redcap: bool = False,
) -> TokenCreated:
    """A new token; `created_by` None is the start-up bootstrap. A scoped admin creates tokens of its study only."""
    study_id = None
    if redcap and study_key is None:
        raise Invalid("a REDCap token belongs to one study (its project): give study_key", errors=[
            {"loc": ["study_key"], "code": "required", "message": "required when format is redcap"}])
    if study_key is not None:
        study = studies.by_key(session, study_key)
        if study is None:
            raise Invalid(f"no study {study_key!r}",
                          errors=[{"loc": ["study_key"], "code": "unknown_study", "message": "no such study"}])
        study_id = study.id
    site_id = _site_of(session, role, study_id, site_key)
    if created_by is not None and created_by.scoped and study_id != created_by.study_id:
        raise Forbidden("a token limited to one study creates tokens of that study only: give its study_key")
    secret = secret or (secrets.token_hex(16).upper() if redcap else new_secret())
    token = repository.add(session, ApiToken(
        secret_hash=hash_secret(secret), role=role, label=label, study_id=study_id, site_id=site_id,
        created_by=created_by.token_id if created_by is not None else None,
    ))
    return TokenCreated(
        id=token.id, role=role, label=label, study_key=study_key, site_key=site_key, created_at=token.created_at,
        token=secret,
    )


def _site_of(session: Session, role: Role, study_id: uuid.UUID | None, site_key: str | None) -> uuid.UUID | None:
    """The site a new token is limited to. Admin tokens manage the whole study, so none has a site."""
    if site_key is None:
        return None
    if study_id is None:
        raise Invalid("a site belongs to a study: give study_key with site_key", errors=[
            {"loc": ["study_key"], "code": "required", "message": "required when site_key is set"}])
    if role == "admin":
        raise Invalid("an admin token cannot be limited to a site", errors=[
            {"loc": ["site_key"], "code": "role", "message": "only coordinator, collector and analyst tokens"}])
    return sites.resolve(session, study_id, site_key, ["site_key"]).id


def revoke(session: Session, token_id: uuid.UUID, principal: Principal) -> None:
    token = repository.get(session, token_id)
    if token is None or not principal.may_access_study(token.study_id):
        raise NotFound(f"no token {token_id}")  # another study's token is not this principal's to know of
    if token.revoked_at is None:
        token.revoked_at = datetime.now(UTC)
        session.flush()


def to_out(token: ApiToken, study_key: str | None, site_key: str | None = None) -> TokenOut:
    return TokenOut(id=token.id, role=token.role, label=token.label,
                    study_key=study_key, site_key=site_key, created_at=token.created_at, revoked_at=token.revoked_at)


def bootstrap(session: Session, bootstrap_secret: str | None) -> str | None:
    """Make sure an admin can get in on a fresh database.

    With COHORT_BOOTSTRAP_TOKEN set and no admin token yet, that secret becomes the admin
    token. Without it, a random admin token is created and returned so the caller can print
    it once. Returns None when an admin token already exists.
    """
    if repository.active_admin_exists(session):
        return None
    if bootstrap_secret:
        if not repository.hash_exists(session, hash_secret(bootstrap_secret)):
            create(session, role="admin", label="bootstrap (COHORT_BOOTSTRAP_TOKEN)", secret=bootstrap_secret)
        return bootstrap_secret
    return create(session, role="admin", label="first start").token
