"""Access logs without secrets: tokens that travel in URLs are redacted before a line is written."""

from __future__ import annotations

import logging
import re

_SECRET_QUERY = re.compile(r"(?i)([?&](?:token|access_token|api_token|key)=)[^&\s]*")
_LINK_PATH = re.compile(r"(/s/)[^/?\s]+")
REDACTED = "[redacted]"


def redact(text: str) -> str:
    return _LINK_PATH.sub(r"\1" + REDACTED, _SECRET_QUERY.sub(r"\1" + REDACTED, text))


class RedactSecrets(logging.Filter):
    """For uvicorn's access logger, whose arguments are (client, method, path?query, version, status)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.msg, str):
            record.msg = redact(record.msg)
        return True


def redact_access_logs() -> None:
    logger = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactSecrets) for f in logger.filters):
        logger.addFilter(RedactSecrets())
