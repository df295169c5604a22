"""Slow clients (slowloris), mixed into ``RelaySMTP``: a command line must be complete
``[smtp] command_timeout`` seconds after its first octet, or the client gets ``421 4.4.2`` and
the connection ends. (The idle timeout governs the time between commands; DATA has its own
rate rule in data.py.)"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from .protocol import RelaySMTP

log = logging.getLogger("mailrelay.smtp")

COMMAND_TOO_SLOW = "421 4.4.2 Command not completed in time, closing connection"


class CommandDeadline:
    def data_received(self: RelaySMTP, data: bytes) -> None:
        super().data_received(data)  # type: ignore[misc]
        if self._command_deadline is None and not self._reading_data:
            self._start_command_deadline()

    def _start_command_deadline(self: RelaySMTP) -> None:
        self._command_deadline = self.loop.call_later(self.settings.command_timeout, self._command_overdue)

    def _stop_command_deadline(self: RelaySMTP) -> None:
        if self._command_deadline is not None:
            self._command_deadline.cancel()
            self._command_deadline = None

    def _command_overdue(self: RelaySMTP) -> None:
        self._command_deadline = None
        buffered = self._reader._buffer  # type: ignore[attr-defined]
        if self._reading_data or not buffered or b"\r\n" in buffered:
            return  # a whole line is waiting for us, not the client for its end
        if self.transport is not None and not self.transport.is_closing():
            session = self.relay_session
            log.info("session=%s client=%s dropped: command line incomplete after %gs (command_timeout)",
                     session.id if session else "-", session.peer_ip if session else "-",
                     self.settings.command_timeout)
            self._writer.write(COMMAND_TOO_SLOW.encode() + b"\r\n")
            self._close()
