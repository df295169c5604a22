"""Logging set-up with E-MailRelay's switches: ``--log``, ``--verbose``, ``--debug``, ``--log-file``
(``%d`` is the date, so files roll daily), ``--syslog[=facility]``/``--no-syslog``, ``--log-time``
and ``--log-format``/``--log-address``. Lines are ``key=value`` text or JSON.

``--log-format`` fields that depend on what a line is about come from context variables: an SMTP
session's task binds its client (:func:`bind_client`), the forwarding code the message it is
sending (:func:`message_context`); a line logged outside either simply has no such field.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import logging.handlers
import os
import sys
import time
from typing import Any, Iterator, Protocol

from .config.settings import LogSettings


class _Peer(Protocol):
    peer_ip: str
    peer_port: int


# Read when a line is formatted, so a PROXY header that changes the client address is honoured.
_client: contextvars.ContextVar[_Peer | None] = contextvars.ContextVar("mailrelay_log_client", default=None)
_message: contextvars.ContextVar[str] = contextvars.ContextVar("mailrelay_log_message", default="")


def bind_client(session: _Peer | None) -> None:
    """Lines logged from now on in this task (and tasks it starts) are about ``session``'s client."""
    _client.set(session)


@contextlib.contextmanager
def message_context(message_id: str) -> Iterator[None]:
    """Lines logged inside the block are about message ``message_id`` (``--log-format=msgid``)."""
    token = _message.set(message_id)
    try:
        yield
    finally:
        _message.reset(token)


def context_fields(fields: frozenset[str]) -> dict[str, Any]:
    """The ``address``, ``port`` and ``msgid`` values of the current context that ``fields`` asks for."""
    out: dict[str, Any] = {}
    peer = _client.get()
    if peer is not None and peer.peer_ip:
        if "address" in fields:
            out["address"] = peer.peer_ip
        if "port" in fields:
            out["port"] = peer.peer_port
    if "msgid" in fields and _message.get():
        out["msgid"] = _message.get()
    return out


def context_prefix(fields: frozenset[str]) -> str:
    """E-MailRelay's forms: ``ADDR; ``, ``ADDR;PORT: `` or ``PORT: `` (the semicolon keeps
    fail2ban patterns simple), then ``(MSGID) ``."""
    values = context_fields(fields)
    prefix = ""
    if "address" in values and "port" in values:
        prefix = f"{values['address']};{values['port']}: "
    elif "address" in values:
        prefix = f"{values['address']}; "
    elif "port" in values:
        prefix = f"{values['port']}: "
    if "msgid" in values:
        prefix += f"({values['msgid']}) "
    return prefix


class DatedFileHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Appends to ``pattern`` with ``%d`` (YYYYMMDD) and ``%h`` (HH) replaced; reopens when they change."""

    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = pattern
        self._current = ""
        self.stream = None  # type: ignore[assignment]
        self._open()

    def _path_now(self) -> str:
        now = time.localtime()
        return self.pattern.replace("%d", time.strftime("%Y%m%d", now)).replace("%h", time.strftime("%H", now))

    def _open(self) -> None:
        name = self._path_now()
        if name != self._current:
            if self.stream is not None:
                self.stream.close()
            os.makedirs(os.path.dirname(os.path.abspath(name)), exist_ok=True)
            self.stream = open(name, "a", encoding="utf-8", buffering=1)
            self._current = name

    def emit(self, record: logging.LogRecord) -> None:
        self._open()
        super().emit(record)


class TextFormatter(logging.Formatter):
    """``[TIME: ]NAME: LEVEL: [CONTEXT]MESSAGE``; ``name`` is ``mailrelay`` (``mailrelay[PID]``
    for syslog, which stamps the time itself)."""

    def __init__(self, with_time: bool, fields: frozenset[str] = frozenset(), name: str = "mailrelay"):
        super().__init__()
        self.with_time = with_time
        self.fields = fields
        self.name = name

    def format(self, record: logging.LogRecord) -> str:
        text = f"{self.name}: {record.levelname.lower()}: {context_prefix(self.fields)}{record.getMessage()}"
        if self.with_time:
            text = time.strftime("%Y%m%d.%H%M%S", time.localtime(record.created)) + \
                f".{int(record.msecs):03d}: " + text
        if record.exc_info and record.levelno >= logging.ERROR:
            text += "\n" + self.formatException(record.exc_info)
        return text


class JsonFormatter(logging.Formatter):
    def __init__(self, fields: frozenset[str] = frozenset()):
        super().__init__()
        self.fields = fields

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"time": record.created, "level": record.levelname.lower(),
                           "logger": record.name, **context_fields(self.fields), "message": record.getMessage()})


def syslog_handler(settings: LogSettings) -> logging.Handler | None:
    """A handler for the system log, or None when it is off or there is no syslog socket."""
    if not (settings.enabled and settings.syslog and os.path.exists(settings.syslog_address)):
        return None
    facility = logging.handlers.SysLogHandler.facility_names[settings.syslog_facility]
    try:
        handler = logging.handlers.SysLogHandler(settings.syslog_address, facility=facility)
    except OSError as e:  # a socket nobody reads: say so on stderr, carry on without it
        print(f"relay: warning: cannot log to syslog at {settings.syslog_address}: {e}", file=sys.stderr)
        return None
    handler.setFormatter(TextFormatter(False, frozenset(settings.fields), f"mailrelay[{os.getpid()}]"))
    return handler


def configure(settings: LogSettings, *, stderr: bool = True) -> None:
    """Install handlers on the ``mailrelay`` logger per the settings."""
    level = logging.WARNING
    if settings.enabled:
        level = logging.DEBUG if settings.verbose else logging.INFO
    fields = frozenset(settings.fields)
    formatter: logging.Formatter = (JsonFormatter(fields) if settings.format == "json"
                                    else TextFormatter(settings.time or "time" in fields, fields))
    root = logging.getLogger("mailrelay")
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)
    root.propagate = False
    handlers: list[logging.Handler] = []
    if settings.file:
        handlers.append(DatedFileHandler(settings.file))
    elif stderr:  # with --close-stderr, stderr is closed once start-up is over, not before
        handlers.append(logging.StreamHandler(sys.stderr))
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    syslog = syslog_handler(settings)
    if syslog is not None:
        root.addHandler(syslog)
    # aiosmtpd logs every command at INFO under "mail.log": only with -vv (or --debug), and not to
    # syslog (it shows AUTH exchanges).
    protocol_log = logging.getLogger("mail.log")
    for handler in list(protocol_log.handlers):
        protocol_log.removeHandler(handler)
    protocol_log.setLevel(logging.DEBUG if settings.verbose >= 2 else logging.WARNING)
    if settings.verbose >= 2:
        for handler in handlers:
            protocol_log.addHandler(handler)
