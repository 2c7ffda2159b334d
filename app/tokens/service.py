"""API tokens: creation (the secret is returned once), revocation and start-up bootstrap."""

from __future__ import annotations

import secrets
import uuid
from datetime import UTC, datetime

from sqlalchemy.orm import Session

from app.core.errors import Invalid, NotFound
from app.core.security import Role, hash_secret, new_secret
from app.studies import repository as studies
from app.tokens import repository
from app.tokens.models import ApiToken
from app.tokens.schemas import TokenCreated, TokenOut


def create(
    session: Session, *, role: Role, label: str, study_key: str | None = None,
    created_by: uuid.UUID | None = None, secret: str | None = None, redcap: bool = False,
) -> TokenCreated:
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
    secret = secret or (secrets.token_hex(16).upper() if redcap else new_secret())
    token = repository.add(session, ApiToken(
        secret_hash=hash_secret(secret), role=role, label=label, study_id=study_id, created_by=created_by,
    ))
    return TokenCreated(
        id=token.id, role=role, label=label, study_key=study_key, created_at=token.created_at, token=secret,
    )


def revoke(session: Session, token_id: uuid.UUID) -> None:
    token = repository.get(session, token_id)
    if token is None:
        raise NotFound(f"no token {token_id}")
    if token.revoked_at is None:
        token.revoked_at = datetime.now(UTC)
        session.flush()


def to_out(token: ApiToken, study_key: str | None) -> TokenOut:
    return TokenOut(id=token.id, role=token.role, label=token.label,
                    study_key=study_key, created_at=token.created_at, revoked_at=token.revoked_at)


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
