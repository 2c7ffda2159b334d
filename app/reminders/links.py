"""Per-participant survey links: opaque tokens, valid until the window closes.

A token is the link's target sealed with AES-256-GCM under a key derived from COHORT_SECRET_KEY
(a random nonce each time), so it reveals nothing (no study, participant or wave can be read
from it) and any change to it fails authentication. Links signed (readable) by earlier versions
still resolve, so messages already sent keep working.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from itsdangerous import BadSignature, URLSafeSerializer

SALT = "cohort.survey-link"
_PREFIX = "s1"  # an opaque token; older tokens are signed JSON
_LINK_IDS = uuid.UUID("6f1d2c8e-3c44-4e9b-9a51-0d3f4f7b2a10")


@dataclass(frozen=True)
class LinkTarget:
    study_key: str
    participant_id: str
    wave: str
    expires_at: datetime

    @property
    def link_id(self) -> uuid.UUID:
        """A stable id for (study, participant, wave): what writes through the link are attributed to."""
        return uuid.uuid5(_LINK_IDS, f"{self.study_key}/{self.participant_id}/{self.wave}")


class LinkExpired(Exception):
    def __init__(self, target: LinkTarget) -> None:
        self.target = target


class LinkInvalid(Exception):
    pass


def _aead(secret: str) -> tuple[bytes, AESGCM]:
    material = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"cohort", info=b"survey-link").derive(secret.encode())
    return hashlib.sha256(material).digest()[:4], AESGCM(material)


def make_token(secret: str, target: LinkTarget) -> str:
    payload = {"s": target.study_key, "p": target.participant_id, "w": target.wave,
               "e": int(target.expires_at.timestamp())}
    kid, aead = _aead(secret)
    nonce = os.urandom(12)
    sealed = kid + nonce + aead.encrypt(nonce, json.dumps(payload, separators=(",", ":")).encode(), kid)
    return _PREFIX + base64.urlsafe_b64encode(sealed).rstrip(b"=").decode()


def _open(secrets: list[str], token: str) -> dict[str, object]:
    if token.startswith(_PREFIX):
        try:
            blob = base64.urlsafe_b64decode(token[len(_PREFIX):] + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            raise LinkInvalid("not a survey link this service issued") from None
        for secret in secrets:
            kid, aead = _aead(secret)
            if blob[:4] == kid:
                try:
                    value: dict[str, object] = json.loads(aead.decrypt(blob[4:16], blob[16:], kid))
                    return value
                except (InvalidTag, ValueError):
                    break
        raise LinkInvalid("not a survey link this service issued")
    try:
        # itsdangerous signs with the last key of the list and accepts any of them
        signed: dict[str, object] = URLSafeSerializer(list(reversed(secrets)), salt=SALT).loads(token)
        return signed
    except BadSignature:
        raise LinkInvalid("not a survey link this service issued") from None


def read_token(secrets: list[str], token: str, now: datetime) -> LinkTarget:
    """`secrets`: the current key first; links issued before a key rotation still resolve."""
    payload = _open(secrets, token)
    try:
        target = LinkTarget(str(payload["s"]), str(payload["p"]), str(payload["w"]),
                            datetime.fromtimestamp(int(str(payload["e"])), UTC))
    except (KeyError, TypeError, ValueError):
        raise LinkInvalid("not a survey link this service issued") from None
    if now >= target.expires_at:
        raise LinkExpired(target)
    return target


def link_for(survey_url: str, token: str) -> str:
    return survey_url.replace("{token}", token) if "{token}" in survey_url else f"{survey_url.rstrip('/')}/{token}"
