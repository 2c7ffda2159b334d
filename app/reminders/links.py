"""Per-participant survey links, signed with COHORT_SECRET_KEY and valid until the window closes."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from itsdangerous import BadSignature, URLSafeSerializer

SALT = "cohort.survey-link"


@dataclass(frozen=True)
class LinkTarget:
    study_key: str
    participant_id: str
    wave: str
    expires_at: datetime


class LinkExpired(Exception):
    def __init__(self, target: LinkTarget) -> None:
        self.target = target


class LinkInvalid(Exception):
    pass


def make_token(secret: str, target: LinkTarget) -> str:
    payload = {"s": target.study_key, "p": target.participant_id, "w": target.wave,
               "e": int(target.expires_at.timestamp())}
    return str(URLSafeSerializer(secret, salt=SALT).dumps(payload))


def read_token(secrets: list[str], token: str, now: datetime) -> LinkTarget:
    """`secrets`: the current key first; links signed before a key rotation still resolve."""
    try:
        # itsdangerous signs with the last key of the list and accepts any of them
        payload = URLSafeSerializer(list(reversed(secrets)), salt=SALT).loads(token)
        target = LinkTarget(str(payload["s"]), str(payload["p"]), str(payload["w"]),
                            datetime.fromtimestamp(int(payload["e"]), UTC))
    except (BadSignature, KeyError, TypeError, ValueError):
        raise LinkInvalid("not a survey link this service issued") from None
    if now >= target.expires_at:
        raise LinkExpired(target)
    return target


def link_for(survey_url: str, token: str) -> str:
    return survey_url.replace("{token}", token) if "{token}" in survey_url else f"{survey_url.rstrip('/')}/{token}"
