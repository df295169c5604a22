"""A recording SMTP server for tests: the next hop a relay under test forwards to.

    sink = Sink().start()          # 127.0.0.1, a free port
    sink.refuse("nobody@", "550 5.1.1 No such user")
    ...
    [message] = sink.wait_for(1)
    assert message.recipients == ["a@example.test"]
    sink.stop()

It runs aiosmtpd in its own thread (aiosmtpd's ``Controller``), so a test can block on it while
the relay's event loop runs elsewhere.
"""

from __future__ import annotations

import email
import email.policy
import socket
import threading
import time
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller

__all__ = ["Sink", "SinkMessage"]


@dataclass(frozen=True)
class SinkMessage:
    """One message the sink accepted: envelope and content as they arrived."""

    sender: str                 # "" for the null sender (bounces)
    recipients: list[str]
    content: bytes
    mail_options: list[str] = field(default_factory=list)

    @property
    def message(self) -> EmailMessage:
        """The content parsed with the standard library (``message["Subject"]``, parts, ...)."""
        return email.message_from_bytes(self.content, policy=email.policy.default)  # type: ignore[return-value]

    @property
    def is_bounce(self) -> bool:
        """A delivery status notification (RFC 3464): null sender and a ``delivery-status`` report."""
        report = self.message
        return (self.sender == "" and report.get_content_type() == "multipart/report"
                and report.get_param("report-type") == "delivery-status")


class _Handler:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.received: list[SinkMessage] = []
        self.refusals: dict[str, str] = {}

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        with self.lock:
            for needle, reply in self.refusals.items():
                if needle in address:
                    return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        sender = "" if envelope.mail_from in ("<>", None) else envelope.mail_from
        with self.lock:
            self.received.append(SinkMessage(sender, list(envelope.rcpt_tos), envelope.original_content,
                                             list(envelope.mail_options)))
        return "250 2.0.0 stored"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Sink:
    """An SMTP server on ``127.0.0.1:port`` that keeps every message it is sent."""

    def __init__(self, port: int = 0):
        self.host = "127.0.0.1"
        self.port = port or _free_port()
        self._handler = _Handler()
        self._controller = Controller(self._handler, hostname=self.host, port=self.port,
                                      enable_SMTPUTF8=True, ready_timeout=10)

    @property
    def address(self) -> str:
        """``host:port``, as ``--forward-to`` takes it."""
        return f"{self.host}:{self.port}"

    def start(self) -> "Sink":
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()

    def refuse(self, needle: str, reply: str = "550 5.1.1 No such user here") -> None:
        """Answer RCPT TO with ``reply`` for every recipient containing ``needle``."""
        with self._handler.lock:
            self._handler.refusals[needle] = reply

    @property
    def messages(self) -> list[SinkMessage]:
        with self._handler.lock:
            return list(self._handler.received)

    def wait_for(self, count: int, timeout: float = 15.0) -> list[SinkMessage]:
        """Block until at least ``count`` messages have arrived; return them all."""
        end = time.monotonic() + timeout
        while True:
            got = self.messages
            if len(got) >= count:
                return got
            if time.monotonic() > end:
                raise AssertionError(f"the sink got {len(got)} message(s) within {timeout:g}s, expected {count}")
            time.sleep(0.02)

    def __enter__(self) -> "Sink":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
