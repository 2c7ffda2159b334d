"""Delivering one email: SMTP when SMTP_URL is set, otherwise .eml files in the data dir's outbox."""

from __future__ import annotations

import re
import smtplib
import socket
import ssl
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit

from app.core.timeutil import utcnow


@dataclass(frozen=True)
class Email:
    to: str
    subject: str
    body: str
    message_id: str  # the same for every attempt of one send, so a repeat can be recognised


_LEADING_DOT = re.compile(rb"(?m)^\.")


class DeliveryError(Exception):
    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


class Sender(Protocol):
    def send(self, email: Email, on_handover: Callable[[], None]) -> None:
        """Deliver; call `on_handover` once the server holds the whole message, just before it is
        told to accept it (the terminating dot of DATA)."""


def build_message(email: Email, sender: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = email.to
    msg["Subject"] = email.subject
    msg["Message-ID"] = email.message_id
    msg["Date"] = format_datetime(utcnow())
    msg.set_content(email.body)
    return msg


def message_id(send_id: str, domain: str) -> str:
    """Deterministic per send: a retry after an uncertain failure carries the same Message-ID,
    which mail clients use to fold duplicates."""
    return f"<{send_id}@{domain}>"


class SmtpSender:
    """SMTP over one connection. The DATA phase is driven here rather than by smtplib.send_message
    so the caller can record the hand-over between the message body and the terminating dot: a
    crash before it means the server never accepted the message, a crash after it means it did."""

    def __init__(self, smtp: smtplib.SMTP, sender: str) -> None:
        self.smtp = smtp
        self.sender = sender

    def send(self, email: Email, on_handover: Callable[[], None]) -> None:
        smtp = self.smtp
        data = build_message(email, self.sender).as_bytes(policy=policy.SMTP)
        payload = _LEADING_DOT.sub(b"..", data)  # RFC 5321 4.5.2 transparency
        if not payload.endswith(b"\r\n"):
            payload += b"\r\n"
        try:
            smtp.ehlo_or_helo_if_needed()
            self._expect(smtp.mail(self.sender), (250,), "MAIL FROM")
            self._expect(smtp.rcpt(email.to), (250, 251), "RCPT TO", email.to)
            self._expect(smtp.docmd("DATA"), (354,), "DATA")
            smtp.send(payload)
            on_handover()
            smtp.send(b".\r\n")
            self._expect(smtp.getreply(), (250,), "end of DATA")
        except DeliveryError:
            self._reset()
            raise
        except (smtplib.SMTPException, OSError) as exc:
            raise DeliveryError(f"SMTP failure: {type(exc).__name__}", permanent=False) from None

    @staticmethod
    def _expect(reply: tuple[int, bytes], ok: tuple[int, ...], step: str, address: str | None = None) -> None:
        code, message = reply
        if code not in ok:
            text = message.decode(errors="replace")[:200]
            if address:  # servers often echo the recipient; it must not reach logs or the database
                text = text.replace(address, "<recipient>")
            raise DeliveryError(f"{step}: {code} {text}", permanent=500 <= code < 600)

    def _reset(self) -> None:
        with suppress(smtplib.SMTPException, OSError):
            self.smtp.rset()


class OutboxSender:
    """Without SMTP_URL: every message is written to an .eml file a developer can open."""

    def __init__(self, directory: Path, sender: str) -> None:
        self.directory = directory
        self.sender = sender

    def send(self, email: Email, on_handover: Callable[[], None]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        name = email.message_id.strip("<>").replace("/", "_") + ".eml"
        on_handover()
        (self.directory / name).write_bytes(bytes(build_message(email, self.sender)))


@contextmanager
def open_sender(smtp_url: str | None, outbox: Path, sender: str) -> Iterator[Sender]:
    """One connection for a batch of messages. Connection failures surface on first use, as DeliveryError."""
    if not smtp_url:
        yield OutboxSender(outbox, sender)
        return
    parts = urlsplit(smtp_url)
    host, port = parts.hostname or "localhost", parts.port
    smtp: smtplib.SMTP | None = None
    try:
        if parts.scheme == "smtps":
            smtp = smtplib.SMTP_SSL(host, port or 465, timeout=30, context=ssl.create_default_context())
        else:
            smtp = smtplib.SMTP(host, port or 25, timeout=30)
            if parts.scheme == "smtp+starttls":
                smtp.starttls(context=ssl.create_default_context())
        if parts.username:
            smtp.login(unquote(parts.username), unquote(parts.password or ""))
        if smtp.sock is not None:
            # The terminating dot is a small write after the body; without this, Nagle's algorithm
            # holds it back until the body is acknowledged, widening the hand-over window.
            smtp.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (smtplib.SMTPException, OSError) as exc:
        failure = str(exc) or type(exc).__name__
        yield _Unreachable(f"cannot reach the mail server: {failure}")
        return
    try:
        yield SmtpSender(smtp, sender)
    finally:
        try:
            smtp.quit()
        except (smtplib.SMTPException, OSError):
            smtp.close()


class _Unreachable:
    def __init__(self, reason: str) -> None:
        self.reason = reason

    def send(self, email: Email, on_handover: Callable[[], None]) -> None:
        raise DeliveryError(self.reason, permanent=False)
