"""Where a webhook may be delivered: public https addresses only (server-side request forgery).

Checked when a subscription is registered and again before every attempt, since what a name
resolves to can change. `COHORT_WEBHOOKS_ALLOW_LOOPBACK` admits http and https to 127.0.0.0/8
and ::1 (development and tests); private, link-local and other special ranges stay refused.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class UnsafeURL(ValueError):
    """The URL may not be delivered to; the message says why."""


def _addresses(host: str, port: int) -> list[IPAddress]:
    try:
        return [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise UnsafeURL(f"the host {host!r} does not resolve") from None
    found: list[IPAddress] = []
    for info in infos:
        raw = str(info[4][0]).split("%", 1)[0]
        found.append(ipaddress.ip_address(raw))
    if not found:
        raise UnsafeURL(f"the host {host!r} does not resolve")
    return found


def _is_loopback(address: IPAddress) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _is_public(address: IPAddress) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


def check(url: str, *, allow_loopback: bool) -> None:
    """Raise `UnsafeURL` unless `url` is https to public addresses (or, when allowed, loopback)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise UnsafeURL("the URL cannot be parsed") from None
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise UnsafeURL("the URL must be https://host/...")
    if parts.username is not None or parts.password is not None:
        raise UnsafeURL("the URL must not carry credentials")
    addresses = _addresses(parts.hostname, port or (443 if parts.scheme == "https" else 80))
    loopback = allow_loopback and all(_is_loopback(a) for a in addresses)
    if parts.scheme == "http" and not loopback:
        raise UnsafeURL("the URL must use https")
    if not loopback:
        refused = [str(a) for a in addresses if not _is_public(a)]
        if refused:
            raise UnsafeURL(f"the URL points to a private, loopback or link-local address ({', '.join(refused)})")
