"""RFC 2920 pipelining on an aiosmtplib connection.

aiosmtplib sends one command and waits for its reply. For a server that offers PIPELINING we send
MAIL, every RCPT and DATA in one write and read the replies in order, turning ``2 + recipients``
round trips into one. aiosmtplib's protocol object expects one reply per command and drops data
that arrives while a reply is waiting to be collected, so for the transaction the connection's
transport is handed to a :class:`ReplyReader` (``transport.set_protocol``), which queues every
reply; afterwards aiosmtplib's protocol gets the transport back. Connection setup, EHLO, STARTTLS
and AUTH stay with aiosmtplib.
"""

from __future__ import annotations

import asyncio
import collections
import re
from dataclasses import dataclass

import aiosmtplib
from aiosmtplib.protocol import normalize_message_line_endings
from aiosmtplib.response import SMTPResponse

_LEADING_DOT = re.compile(rb"(?m)^\.")
MAX_REPLY = 64 * 1024


def encode_data(content: bytes) -> bytes:
    """The DATA payload: CRLF line ends only (a bare CR or LF kept in the spool can never end a
    line downstream, so smuggling stops here), dot-stuffed, with the terminating ``.``."""
    crlf = content.count(b"\r\n")
    if content.count(b"\r") != crlf or content.count(b"\n") != crlf:  # a bare CR or LF somewhere
        content = normalize_message_line_endings(content)
    data = _LEADING_DOT.sub(b"..", content) if content.startswith(b".") or b"\n." in content else content
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data + b".\r\n"


class ReplyReader(asyncio.Protocol):
    """Collects SMTP replies from a transport while it is borrowed from aiosmtplib."""

    def __init__(self, original: asyncio.BaseProtocol):
        self.original = original
        self.buffer = bytearray()
        self.replies: collections.deque[SMTPResponse] = collections.deque()
        self.error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (reply := self._parse_one()) is not None:
            self.replies.append(reply)
        if len(self.buffer) > MAX_REPLY:
            self.error = aiosmtplib.SMTPResponseException(-1, "reply too long")
        self._wake()

    def _parse_one(self) -> SMTPResponse | None:
        lines, offset = [], 0
        while (end := self.buffer.find(b"\n", offset)) >= 0:
            line = bytes(self.buffer[offset:end + 1])
            offset = end + 1
            try:
                code = int(line[:3])
            except ValueError:
                self.error = aiosmtplib.SMTPResponseException(-1, f"malformed reply {line[:60]!r}")
                return None
            lines.append(line[4:].strip(b" \t\r\n").decode("utf-8", "surrogateescape"))
            if line[3:4] != b"-":
                del self.buffer[:offset]
                return SMTPResponse(code, "\n".join(lines))
        return None

    def eof_received(self) -> bool:
        self.error = self.error or aiosmtplib.SMTPServerDisconnected("server closed the connection")
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.error = self.error or aiosmtplib.SMTPServerDisconnected(f"connection lost: {exc or 'closed'}")
        self._wake()
        self.original.connection_lost(exc)  # aiosmtplib must learn that its connection is gone

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next(self, timeout: float) -> SMTPResponse:
        while not self.replies:
            if self.error is not None:
                raise self.error
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(timeout):
                    await self._waiter
            except TimeoutError:
                raise aiosmtplib.SMTPReadTimeoutError("timed out waiting for the server's reply") from None
        return self.replies.popleft()


@dataclass
class TransactionReplies:
    mail: SMTPResponse
    rcpts: list[SMTPResponse]
    data: SMTPResponse | None   # the reply to DATA (354 expected); None when DATA was not sent
    final: SMTPResponse | None  # the reply after the content; None when no content was sent


async def pipelined_transaction(client: aiosmtplib.SMTP, mail_command: bytes, rcpt_commands: list[bytes],
                                content: bytes, timeout: float, *, send_data: bool = True) -> TransactionReplies:
    """Send MAIL, RCPT... and (if ``send_data``) DATA as one group; then the content if DATA got 354."""
    protocol = client.protocol
    transport = getattr(protocol, "transport", None)
    if protocol is None or transport is None or transport.is_closing():
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    commands = [mail_command, *rcpt_commands] + ([b"DATA"] if send_data else [])
    reader = ReplyReader(protocol)
    transport.set_protocol(reader)
    try:
        transport.write(b"".join(c + b"\r\n" for c in commands))
        replies = [await reader.next(timeout) for _ in commands]
        mail, rcpts = replies[0], replies[1:1 + len(rcpt_commands)]
        data_reply = replies[-1] if send_data else None
        final = None
        if data_reply is not None and data_reply.code == 354:
            if 200 <= mail.code < 300 and any(200 <= r.code < 300 for r in rcpts):
                transport.write(encode_data(content))
                final = await reader.next(timeout)
            else:
                # RFC 2920 3.1: a server may answer 354 although no recipient was accepted;
                # end the (empty) data at once and let the server refuse it.
                transport.write(b".\r\n")
                await reader.next(timeout)
    finally:
        if not transport.is_closing():
            transport.set_protocol(protocol)
    return TransactionReplies(mail, rcpts, data_reply, final)
