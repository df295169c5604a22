"""Logging set-up with E-MailRelay's switches: ``--log``, ``--verbose``, ``--log-file`` (``%d`` is the
date, so files roll daily), ``--no-syslog``, ``--log-time``. Lines are ``key=value`` text or JSON.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import sys
import time

from .config.settings import LogSettings


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
    def __init__(self, with_time: bool):
        super().__init__()
        self.with_time = with_time

    def format(self, record: logging.LogRecord) -> str:
        text = f"mailrelay: {record.levelname.lower()}: {record.getMessage()}"
        if self.with_time:
            text = time.strftime("%Y%m%d.%H%M%S", time.localtime(record.created)) + \
                f".{int(record.msecs):03d}: " + text
        if record.exc_info and record.levelno >= logging.ERROR:
            text += "\n" + self.formatException(record.exc_info)
        return text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"time": record.created, "level": record.levelname.lower(),
                           "logger": record.name, "message": record.getMessage()})


def configure(settings: LogSettings, *, stderr: bool = True) -> None:
    """Install handlers on the ``mailrelay`` logger per the settings."""
    level = logging.WARNING
    if settings.enabled:
        level = logging.DEBUG if settings.verbose else logging.INFO
    formatter: logging.Formatter = (JsonFormatter() if settings.format == "json"
                                    else TextFormatter(settings.time))
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
    if settings.enabled and settings.syslog and os.path.exists("/dev/log"):
        syslog = logging.handlers.SysLogHandler("/dev/log", facility=logging.handlers.SysLogHandler.LOG_MAIL)
        syslog.setFormatter(logging.Formatter("mailrelay[%(process)d]: %(levelname)s: %(message)s"))
        root.addHandler(syslog)
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    # aiosmtpd logs every command at INFO under "mail.log": only with -vv.
    logging.getLogger("mail.log").setLevel(logging.DEBUG if settings.verbose >= 2 else logging.WARNING)
    if settings.verbose >= 2:
        for handler in handlers:
            logging.getLogger("mail.log").addHandler(handler)
