"""One HTTP attempt: checked address, signed body, no redirects, a short timeout, no proxies."""

from __future__ import annotations

import time

import httpx

from app.webhooks import signing, urls


def post(url: str, secret: str, msg_id: str, body: str, *, timeout: float,
         allow_loopback: bool) -> tuple[int | None, str | None]:
    """Returns (the receiver's status code or None, an error or None when the receiver took it)."""
    try:
        urls.check(url, allow_loopback=allow_loopback)  # again: what the name resolves to may have changed
    except urls.UnsafeURL as exc:
        return None, f"refused: {exc}"
    headers = signing.headers(secret, msg_id, int(time.time()), body)
    try:
        with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client:
            response = client.post(url, content=body.encode(), headers=headers)
    except httpx.TimeoutException:
        return None, f"no answer within {timeout:g} s"
    except httpx.HTTPError as exc:
        return None, f"{type(exc).__name__}: {exc}"[:500]
    code = response.status_code
    if 200 <= code < 300:
        return code, None
    if 300 <= code < 400:
        return code, f"HTTP {code}: redirects are not followed"
    return code, f"HTTP {code}"
