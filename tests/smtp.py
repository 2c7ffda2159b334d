"""A real SMTP server on loopback (aiosmtpd) that keeps every message, and can refuse some on purpose."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from typing import Any

from aiosmtpd.controller import Controller

from tests.conftest import free_port


@dataclass
class Received:
    to: str
    subject: str
    message_id: str
    body: str
    at: float


@dataclass
class Capture:
    """Handler: stores messages; `fail_first[address] = n` answers 451 to the first n attempts."""

    messages: list[Received] = field(default_factory=list)
    fail_first: dict[str, int] = field(default_factory=dict)
    attempts: Counter[str] = field(default_factory=Counter)
    delay: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        # A slow exchange before the message (network, greylisting checks). Once the terminating
        # dot arrives the message is accepted at once, as a queueing MTA does.
        if self.delay:
            await asyncio.sleep(self.delay)
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        to = envelope.rcpt_tos[0]
        with self.lock:
            self.attempts[to] += 1
            if self.attempts[to] <= self.fail_first.get(to, 0):
                return "451 4.3.0 try again later"
        msg: Message = message_from_bytes(envelope.content)
        body = msg.get_payload(decode=True)
        with self.lock:
            self.messages.append(Received(to=to, subject=str(msg["Subject"]), message_id=str(msg["Message-ID"]),
                                          body=body.decode() if isinstance(body, bytes) else str(body),
                                          at=time.time()))
        return "250 OK"

    def to(self, address: str) -> list[Received]:
        with self.lock:
            return [m for m in self.messages if m.to == address]


class SmtpServer:
    def __init__(self) -> None:
        self.capture = Capture()
        self.port = free_port()
        self.controller = Controller(self.capture, hostname="127.0.0.1", port=self.port)

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    def __enter__(self) -> SmtpServer:
        self.controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.controller.stop()
