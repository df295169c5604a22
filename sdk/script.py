"""Write ``pipe:`` filters in Python: read the envelope, look at the message, answer with a decision.

A ``pipe:/path/to/script`` filter gets the message on stdin and the envelope in environment
variables; it answers with E-MailRelay's exit codes and ``<<response>>`` lines, and may write an
edited message to stdout. This module does that part, so a filter is one function::

    #!/usr/bin/env python3
    from mailrelay_sdk import script

    def check(mail: script.Mail) -> script.Decision | None:
        if "lottery" in mail.headers.get("Subject", "").lower():
            return script.reject("Looks like spam", code=554)
        mail.add_header("X-Checked-By", "lottery-filter")
        return None   # accept, with the added header

    if __name__ == "__main__":
        script.main(check)

An exception in the function never rejects mail: the client gets a temporary failure (451) and
the traceback goes to stderr, which the relay logs.
"""

from __future__ import annotations

import email.parser
import email.policy
import os
import re
import sys
import traceback
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import BinaryIO, Callable, Mapping, NoReturn, TextIO

__all__ = ["Decision", "Mail", "ScriptEnvelope", "abandon", "accept", "main", "reject", "run", "tempfail"]

_HEADER_NAME = re.compile(r"[!-9;-~]+")  # RFC 5322 2.2: printable ASCII except ":"
_PARSER = email.parser.BytesHeaderParser(policy=email.policy.SMTPUTF8)
TEMPFAIL_TEXT = "Temporary local problem, please try again later"


@dataclass(frozen=True)
class ScriptEnvelope:
    """The envelope as the ``pipe:`` filter kind passes it (one environment variable each)."""

    sender: str = ""                     # MAIL_FROM ("" for the null sender)
    recipients: tuple[str, ...] = ()     # RCPT_TO, comma-separated
    client_ip: str = ""                  # CLIENT_IP
    helo: str = ""                       # HELO
    auth_user: str = ""                  # AUTH_USER ("" when the client did not authenticate)
    message_id: str = ""                 # MESSAGE_ID: the Message-ID header, if any
    spool_id: str = ""                   # SPOOL_ID

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> "ScriptEnvelope":
        env = os.environ if environ is None else environ
        recipients = tuple(r for r in env.get("RCPT_TO", "").split(",") if r)
        return cls(env.get("MAIL_FROM", ""), recipients, env.get("CLIENT_IP", ""), env.get("HELO", ""),
                   env.get("AUTH_USER", ""), env.get("MESSAGE_ID", ""), env.get("SPOOL_ID", ""))


@dataclass
class Mail:
    """The message a filter looks at: ``content`` (CRLF line ends, as spooled) and its envelope.

    ``headers`` is the parsed header section, for reading. Edit with :meth:`add_header`,
    :meth:`remove_header` or :meth:`replace_content`; the edited message is what the relay keeps.
    """

    content: bytes
    envelope: ScriptEnvelope = field(default_factory=ScriptEnvelope)
    edited: bool = False
    _headers: EmailMessage | None = field(default=None, repr=False)

    @property
    def headers(self) -> EmailMessage:
        if self._headers is None:
            head = self.content.split(b"\r\n\r\n", 1)[0].replace(b"\r\n", b"\n")
            self._headers = _PARSER.parsebytes(head + b"\n\n")  # type: ignore[assignment]
        return self._headers  # type: ignore[return-value]

    @property
    def body(self) -> bytes:
        """Everything after the blank line that ends the header section."""
        _, sep, body = self.content.partition(b"\r\n\r\n")
        return body if sep else b""

    def add_header(self, name: str, value: str) -> None:
        """Put ``Name: value`` at the top of the header section (where trace fields go)."""
        if not _HEADER_NAME.fullmatch(name):
            raise ValueError(f"not a header field name: {name!r}")
        if any(c in value for c in "\r\n\0"):
            raise ValueError("a header value cannot contain CR, LF or NUL")
        self.replace_content(f"{name}: {value}\r\n".encode() + self.content)

    def remove_header(self, name: str) -> int:
        """Remove every ``name`` field (with its continuation lines); return how many went."""
        head, sep, body = self.content.partition(b"\r\n\r\n")
        kept: list[bytes] = []
        removed, skipping = 0, False
        for line in head.split(b"\r\n"):
            if line[:1] in (b" ", b"\t"):  # a continuation line belongs to the field above
                if not skipping:
                    kept.append(line)
                continue
            skipping = line.split(b":", 1)[0].strip().lower() == name.lower().encode()
            removed += skipping
            if not skipping:
                kept.append(line)
        if removed:
            self.replace_content(b"\r\n".join(kept) + sep + body)
        return removed

    def replace_content(self, content: bytes) -> None:
        self.content = content
        self.edited = True
        self._headers = None


@dataclass(frozen=True)
class Decision:
    """What the filter answers: an E-MailRelay exit code and the ``<<response>>`` lines."""

    exit_code: int = 0
    response: str = ""
    reason: str = ""   # logged by the relay, never shown to the client


def accept() -> Decision:
    """Carry on (an edited message is passed on)."""
    return Decision(0)


def reject(text: str, *, code: int = 550, reason: str = "") -> Decision:
    """Refuse the message for good: the SMTP client gets ``code`` (5xx) and ``text``."""
    if not 500 <= code <= 599:
        raise ValueError(f"reject() needs a 5xx code, not {code} (use tempfail() for 4xx)")
    return Decision(1, f"{code} {text}", reason)


def tempfail(text: str = TEMPFAIL_TEXT, *, code: int = 451, reason: str = "") -> Decision:
    """Refuse for now: the client (or the queue runner) tries again later."""
    if not 400 <= code <= 499:
        raise ValueError(f"tempfail() needs a 4xx code, not {code}")
    return Decision(1, f"{code} {text}", reason)


def abandon() -> Decision:
    """The filter has taken the message (stored or deleted it): acknowledge it, keep nothing."""
    return Decision(100)


def _line(text: str) -> str:
    # One <<...>> line each: no line breaks, and no ">>" that would end it early.
    return "<<" + re.sub(r"[\r\n\0]+", " ", text).replace(">>", "> >") + ">>\n"


def run(handler: Callable[[Mail], Decision | None], *, stdin: BinaryIO | None = None,
        stdout: BinaryIO | None = None, stderr: TextIO | None = None,
        environ: Mapping[str, str] | None = None) -> int:
    """Read the message and envelope, call ``handler``, write its answer; return the exit code."""
    stdin = stdin or sys.stdin.buffer
    stdout = stdout or sys.stdout.buffer
    stderr = stderr or sys.stderr
    mail = Mail(stdin.read(), ScriptEnvelope.from_environ(environ))
    try:
        decision = handler(mail) or accept()
        if not isinstance(decision, Decision):
            raise TypeError(f"the filter returned {decision!r}, not a Decision or None")
    except Exception as e:  # a bug in the filter must never turn into a permanent rejection
        traceback.print_exc(file=stderr)
        decision = tempfail(reason=f"filter error: {type(e).__name__}: {e}")
    if decision.exit_code in (0, 101, 103):
        if mail.edited:
            stdout.write(mail.content)
    elif decision.response:
        stdout.write(_line(decision.response).encode("utf-8"))
        if decision.reason:
            stdout.write(_line(decision.reason).encode("utf-8"))
    stdout.flush()
    return decision.exit_code


def main(handler: Callable[[Mail], Decision | None]) -> NoReturn:
    """Run ``handler`` as the program's filter and exit with its code."""
    sys.exit(run(handler))
