"""Timeouts, mixed into ``RelaySMTP``: the idle timeout between commands, and for slow clients
(slowloris) a deadline for each command line: it must be complete ``[smtp] command_timeout``
seconds after its first octet, or the client gets ``421 4.4.2`` and the connection ends. (DATA
has its own rate rule in data.py.)

Both deadlines move with every command. Cancelling a timer and making a new one each time (as
aiosmtpd does for the idle timeout) costs more than parsing the command, so a deadline that
moves later is only noted: its timer, armed for an earlier time, finds the new deadline when it
fires and re-arms itself for it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from .protocol import RelaySMTP

log = logging.getLogger("mailrelay.smtp")

COMMAND_TOO_SLOW = "421 4.4.2 Command not completed in time, closing connection"


class CommandDeadline:
    # ------------------------------------------------------------ idle timeout (aiosmtpd's)
    def _reset_timeout(self: RelaySMTP, duration: float | None = None) -> None:
        deadline = self.loop.time() + (duration or self._timeout_duration)
        self._idle_deadline = deadline
        timer = self._timeout_handle  # aiosmtpd's name: its connection_lost cancels it
        if timer is None or timer.cancelled() or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._timeout_handle = self.loop.call_at(deadline, self._idle_timer_fired)

    def _idle_timer_fired(self: RelaySMTP) -> None:
        if self.loop.time() < self._idle_deadline:  # the deadline moved on since it was armed
            self._timeout_handle = self.loop.call_at(self._idle_deadline, self._idle_timer_fired)
        else:
            self._timeout_cb()

    # ------------------------------------------------------------ command deadline
    def data_received(self: RelaySMTP, data: bytes) -> None:
        super().data_received(data)  # type: ignore[misc]
        if self._command_due is None and not self._reading_data:
            self._start_command_deadline()

    def _start_command_deadline(self: RelaySMTP) -> None:
        self._command_due = self.loop.time() + self.settings.command_timeout
        if self._command_timer is None:  # else it is armed for an earlier time, and re-arms then
            self._command_timer = self.loop.call_at(self._command_due, self._command_timer_fired)

    def _stop_command_deadline(self: RelaySMTP) -> None:
        self._command_due = None  # the timer, if armed, finds nothing due and stops

    def _cancel_command_timer(self: RelaySMTP) -> None:
        self._command_due = None
        if self._command_timer is not None:
            self._command_timer.cancel()
            self._command_timer = None

    def _command_timer_fired(self: RelaySMTP) -> None:
        self._command_timer = None
        due = self._command_due
        if due is None:
            return
        if self.loop.time() < due:
            self._command_timer = self.loop.call_at(due, self._command_timer_fired)
            return
        self._command_due = None
        self._command_overdue()

    def _command_overdue(self: RelaySMTP) -> None:
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
