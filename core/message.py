"""The message handed to ``on_receive``, ``on_filter``, ``route`` and ``deliver``."""

from __future__ import annotations

import email.parser
import email.policy
import re
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from .spool.envelope import Envelope
from .types import Session, Transaction

_HEADER_PARSER = email.parser.BytesHeaderParser(policy=email.policy.SMTPUTF8)
# "Message-ID:" at the start of a header line, with any continuation lines of its value.
_MESSAGE_ID = re.compile(rb"^message-id:([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", re.IGNORECASE | re.MULTILINE)


@dataclass
class Message:
    """Envelope plus content. ``id`` is the spool id (``""`` before the message is written)."""

    envelope: Envelope
    content: bytes
    id: str = ""
    content_path: Path | None = None
    envelope_path: Path | None = None   # .envelope.new (server stage) or .envelope.busy (client stage)
    session: Session | None = None
    transaction: Transaction | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    _headers: EmailMessage | None = field(default=None, repr=False)

    @property
    def headers(self) -> EmailMessage:
        """The parsed header section (body not included); parsed once, on first use."""
        if self._headers is None:
            head, _, _ = self.content.partition(b"\r\n\r\n")
            self._headers = _HEADER_PARSER.parsebytes(head + b"\r\n\r\n")  # type: ignore[assignment]
        return self._headers  # type: ignore[return-value]

    @property
    def message_id(self) -> str:
        """The ``Message-ID`` header, or ``""``. Found by a scan of the header section, not a
        parse: filters ask for it on every message, and a full header parse costs more than
        some filters themselves."""
        head = b"" if self.content.startswith(b"\r\n") else self.content.split(b"\r\n\r\n", 1)[0]
        match = _MESSAGE_ID.search(head)
        if match is None:
            return ""
        return match.group(1).replace(b"\r\n", b"").decode("utf-8", "replace").strip()

    def replace_content(self, content: bytes) -> None:
        self.content = content
        self._headers = None
