"""The DATA reader, mixed into ``RelaySMTP``: fast, and strict about where a message ends."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from .protocol import RelaySMTP

log = logging.getLogger("mailrelay.smtp")

TEXT_LINE_LIMIT = 998         # RFC 5321 4.5.3.1.6: 1000 octets including CRLF
DATA_END = b"\r\n.\r\n"
READ_CHUNK = 65536
DATA_TOO_SLOW = "421 4.4.2 Message data arriving too slowly, closing connection"


class DataReader:
    async def _read_data(self: RelaySMTP) -> tuple[bytes | None, str]:
        """Read up to CRLF.CRLF; return (unstuffed content, "") or (None, error reply).

        Only the exact sequence CRLF "." CRLF ends the data (so ``\\n.\\n``, ``\\r.\\r`` and mixed
        forms are content, and SMTP smuggling cannot split one message into two). An over-size
        or over-long message is read to its end and discarded before the error reply, as
        RFC 5321 4.2.5 implies. Data that falls behind ``min_data_rate`` (after a first
        ``command_timeout`` of grace) is :data:`DATA_TOO_SLOW`, and the connection must end.
        """
        rate = self.settings.min_data_rate
        start = self.loop.time() + self.settings.command_timeout
        reader = self._reader
        limit = self.settings.size
        buf = bytearray(b"\r\n")  # the CRLF that ended the DATA command, so "." on line one ends too
        scan_from = 0
        too_big = False
        received = 0
        while True:
            end = buf.find(DATA_END, scan_from)
            if end >= 0:
                break
            try:
                async with asyncio.timeout_at(start + received / rate if rate else None):
                    chunk = await reader.read(READ_CHUNK)
            except TimeoutError:
                log.info("session=%s client=%s dropped: DATA slower than %d octets/s (min_data_rate)",
                         self.relay_session.id if self.relay_session else "-",
                         self.relay_session.peer_ip if self.relay_session else "-", rate)
                return None, DATA_TOO_SLOW
            if not chunk:
                raise ConnectionResetError("connection closed during DATA")
            received += len(chunk)
            if limit and not too_big and received > limit + len(DATA_END):
                too_big = True
            if too_big:
                del buf[:-4]  # keep only what could start the end marker
            scan_from = max(0, len(buf) - 4)
            buf += chunk
            self._reset_timeout()
        leftover = bytes(buf[end + len(DATA_END):])
        if leftover:
            # Pipelined commands after the end of data: give them back to the command reader.
            reader._buffer[0:0] = leftover  # type: ignore[attr-defined]
        if too_big:
            return None, f"552 5.3.4 Message size exceeds fixed maximum message size ({limit} octets)"
        stuffed = bytes(buf[: end + 2])  # leading CRLF + lines, each with its CRLF
        body = stuffed.replace(b"\r\n.", b"\r\n")[2:]
        if limit and len(body) > limit:
            return None, f"552 5.3.4 Message size exceeds fixed maximum message size ({limit} octets)"
        if len(body) > TEXT_LINE_LIMIT and max(map(len, body.split(b"\r\n"))) > TEXT_LINE_LIMIT:
            return None, "500 5.5.2 Line too long: RFC 5321 limits text lines to 1000 octets including CRLF"
        return body, ""
