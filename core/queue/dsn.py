"""Delivery status notifications: the report a sender gets when mail cannot be delivered.

:func:`build_dsn` writes an RFC 3464 report inside an RFC 6522 ``multipart/report``: a human
explanation, the machine-readable ``message/delivery-status`` part, and the original message's
header section (never its body). When the sender or a recipient address is not ASCII the report
uses RFC 6533's ``message/global-delivery-status`` and ``message/global-headers`` instead.

Everything that came from outside (addresses, the remote server's reply, host names from DNS) is
reduced to one line before it is written, so no value can start a header field or a MIME part of
its own.
"""

from __future__ import annotations

import binascii
import re
import secrets
import textwrap
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import format_datetime, make_msgid
from typing import Iterator, Literal, Sequence

__all__ = ["RecipientReport", "build_dsn", "is_bounce", "HEADER_LIMIT"]

#: Octets of the original header section copied into a report (Postfix's bounce_size_limit).
HEADER_LIMIT = 50_000

_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")
_SMTP_REPLY = re.compile(r"[2-5]\d\d(?:[ -]|$)")
_NEWLINE = re.compile(rb"\r\n|\r|\n")
_HEADER_LINE = re.compile(rb"[!-9;-~]+:|[ \t]")
# C0 and C1 controls, DEL, Unicode line separators and lone surrogates (undecodable input bytes).
_CONTROL = "\\x00-\\x1f\\x7f-\\x9f\\u2028\\u2029\\ud800-\\udfff"
_NOT_LITERAL_ASCII = re.compile(r"[^\x20-\x7e]")
_NOT_LITERAL_UTF8 = re.compile(f"[{_CONTROL}]")
# RFC 6533 utf-8-addr-unitext: QUCHAR excludes SP, "\", "+" and "=" as well as controls.
_NOT_LITERAL_UNITEXT = re.compile(f"[{_CONTROL} \\\\+=]")
_FOLD_AT = 78
_LONGEST_WORD = 900  # octets; a longer run without spaces is split to keep lines under 998


@dataclass(frozen=True)
class RecipientReport:
    """What happened to one recipient, as one per-recipient block of the report.

    ``status`` is an RFC 3463 enhanced status code (``5.1.1``); ``diagnostic`` the remote
    server's reply (``550 5.1.1 No such user``) or, for failures with no reply (null MX, expiry),
    a short explanation. ``remote_mta`` is the host that answered. ``will_retry_until`` is used
    for ``delayed`` reports only. Datetimes must be timezone-aware.
    """

    recipient: str
    action: Literal["failed", "delayed"]
    status: str
    diagnostic: str = ""
    remote_mta: str = ""
    last_attempt: datetime | None = None
    will_retry_until: datetime | None = None

    def __post_init__(self) -> None:
        if self.action not in ("failed", "delayed"):
            raise ValueError(f"action must be 'failed' or 'delayed', not {self.action!r}")
        if not _STATUS.fullmatch(self.status):
            raise ValueError(f"status {self.status!r} is not an RFC 3463 code such as 5.1.1")
        if not self.recipient:
            raise ValueError("recipient is empty")
        for when in (self.last_attempt, self.will_retry_until):
            _require_aware(when)


def is_bounce(sender: str) -> bool:
    """True for the null reverse-path (``MAIL FROM:<>``), the envelope sender of every report.

    A message from it must never be reported on in turn (RFC 5321 section 4.5.5), or two
    relays could bounce a bounce back and forth for ever. The spool holds it as ``""``;
    ``"<>"`` is accepted too.
    """
    return sender.strip() in ("", "<>")


def build_dsn(*, reporting_mta: str, sender: str, original_content: bytes,
              reports: Sequence[RecipientReport], arrival_date: datetime, original_id: str = "",
              now: datetime | None = None) -> bytes:
    """The report on ``reports`` for ``sender``, as a complete message with CRLF line ends.

    Spool it with the null reverse-path ``""`` as its envelope sender and ``sender`` as its one
    recipient. ``reporting_mta`` is this relay's host name; ``original_id`` its spool id for the
    message (written as ``X-MailRelay-Id``); ``now`` the report's ``Date`` (default: the current
    time). The subject says "Undelivered" if any recipient failed, "Delayed" if all are delayed.

    An ASCII-only report is 7-bit throughout: non-ASCII in a server's reply is escaped in the
    machine-readable part, and an original header section that is not 7-bit clean comes back
    quoted-printable. An internationalised report (sender or a recipient address not ASCII)
    sends its UTF-8 parts ``8bit`` and, when the sender is not ASCII, has a UTF-8 ``To``
    header: it needs 8BITMIME, and then SMTPUTF8, on the way back.

    Raises ValueError for what cannot be reported: no reports, a null or unusable ``sender``,
    a ``reporting_mta`` that is not a host name, or a naive datetime.
    """
    if not reports:
        raise ValueError("nothing to report: no recipients")
    if is_bounce(sender):
        raise ValueError("the null reverse-path never gets a report (is_bounce)")
    if _NOT_LITERAL_UTF8.search(sender) or len(sender.encode("utf-8")) > _LONGEST_WORD:
        raise ValueError(f"cannot send a report to {sender!r}")
    if not _HOST.fullmatch(reporting_mta):
        raise ValueError(f"reporting_mta {reporting_mta!r} is not a host name")
    if original_id and not re.fullmatch(r"[!-~]{1,200}", original_id):
        raise ValueError(f"original_id {original_id!r} is not printable ASCII")
    now = now or datetime.now(timezone.utc)
    _require_aware(arrival_date)
    _require_aware(now)

    international = not sender.isascii() or not all(r.recipient.isascii() for r in reports)
    failed = any(r.action == "failed" for r in reports)
    status_type = "global-delivery-status" if international else "delivery-status"
    parts = [
        ("Notification", "text/plain; charset=utf-8",
         _explanation(reporting_mta, reports, arrival_date).encode("utf-8")),
        ("Delivery report", f"message/{status_type}",
         _delivery_status(reporting_mta, reports, arrival_date, original_id, international)),
        ("Undelivered Message Headers",
         "message/global-headers" if international else "text/rfc822-headers",
         _header_section(original_content)),
    ]
    encoded = [(description, ctype, *_transfer_encoding(body, allow_8bit=international))
               for description, ctype, body in parts]
    boundary = _boundary(body for *_, body in encoded)

    head = [
        _field("From", f'"Mail Delivery System" <MAILER-DAEMON@{reporting_mta}>'),
        _field("To", f"<{sender}>"),
        _field("Subject", "Undelivered Mail Returned to Sender" if failed
               else "Delayed Mail (still being retried)"),
        _field("Date", format_datetime(now)),
        _field("Message-ID", make_msgid(domain=reporting_mta)),
        _field("Auto-Submitted", "auto-replied"),
        _field("MIME-Version", "1.0"),
        _field("Content-Type", f'multipart/report; report-type={status_type}; boundary="{boundary}"'),
    ]
    if any(cte == "8bit" for _, _, cte, _ in encoded):
        head.append(_field("Content-Transfer-Encoding", "8bit"))
    out = ["".join(head).encode("utf-8"), b"\r\nThis is a MIME-encapsulated message.\r\n"]
    for description, ctype, cte, body in encoded:
        part_head = _field("Content-Description", description) + _field("Content-Type", ctype)
        if cte != "7bit":
            part_head += _field("Content-Transfer-Encoding", cte)
        out += [f"\r\n--{boundary}\r\n{part_head}\r\n".encode("ascii"), body]
    out.append(f"\r\n--{boundary}--\r\n".encode("ascii"))
    return b"".join(out)


def _explanation(reporting_mta: str, reports: Sequence[RecipientReport], arrival: datetime) -> str:
    received = format_datetime(arrival)
    failed = [r for r in reports if r.action == "failed"]
    delayed = [r for r in reports if r.action == "delayed"]
    paragraphs = [textwrap.fill(f"This is the mail delivery system at {reporting_mta}.", 76)]
    if failed:
        paragraphs.append(textwrap.fill(
            f"Your message of {received} could not be delivered to the following recipients. "
            "This is a permanent error; delivery will not be retried.", 76))
        paragraphs += [_recipient_line(r) for r in failed]
    if delayed:
        paragraphs.append(textwrap.fill(
            f"Your message of {received} has not yet been delivered to the following recipients. "
            "Delivery is still being retried; you do not need to send it again.", 76))
        paragraphs += [_recipient_line(r) for r in delayed]
    paragraphs.append("The delivery report and the header section of your message are attached.")
    return "\n\n".join(paragraphs).replace("\n", "\r\n") + "\r\n"


def _recipient_line(report: RecipientReport) -> str:
    line = f"<{_text(report.recipient)}>: "
    if report.remote_mta:
        line += f"host {_text(report.remote_mta)} said: "
    line += _text(report.diagnostic) or f"delivery status {report.status}"
    if report.action == "delayed" and report.will_retry_until:
        line += f" (will retry until {format_datetime(report.will_retry_until)})"
    return textwrap.fill(line, 76, subsequent_indent="    ", break_on_hyphens=False)


def _delivery_status(reporting_mta: str, reports: Sequence[RecipientReport], arrival: datetime,
                     original_id: str, international: bool) -> bytes:
    text = _NOT_LITERAL_UTF8 if international else _NOT_LITERAL_ASCII
    blocks = [_field("Reporting-MTA", f"dns; {reporting_mta}")
              + _field("Arrival-Date", format_datetime(arrival))
              + (_field("X-MailRelay-Id", original_id) if original_id else "")]
    for r in reports:
        block = (_field("Final-Recipient", _typed_address(r.recipient))
                 + _field("Action", r.action) + _field("Status", r.status))
        if r.remote_mta:
            block += _field("Remote-MTA", f"dns; {_escape(_one_line(r.remote_mta), text)}")
        if r.diagnostic.strip():
            diagnostic = _one_line(r.diagnostic)
            kind = "smtp" if _SMTP_REPLY.match(diagnostic) else "X-MailRelay"
            block += _field("Diagnostic-Code", f"{kind}; {_escape(diagnostic, text)}")
        if r.last_attempt:
            block += _field("Last-Attempt-Date", format_datetime(r.last_attempt))
        if r.action == "delayed" and r.will_retry_until:
            block += _field("Will-Retry-Until", format_datetime(r.will_retry_until))
        blocks.append(block)
    return "\r\n".join(blocks).encode("utf-8")


def _typed_address(address: str) -> str:
    if address.isascii():
        return f"rfc822; {_escape(address, _NOT_LITERAL_ASCII)}"
    return f"utf-8; {_escape(address, _NOT_LITERAL_UNITEXT)}"


def _header_section(content: bytes) -> bytes:
    """The original's header lines, up to the first line that is not one (the blank line)."""
    lines = _NEWLINE.split(content[:HEADER_LIMIT])
    if len(content) > HEADER_LIMIT:
        lines.pop()  # possibly cut short
    kept: list[bytes] = []
    for line in lines:
        if not _HEADER_LINE.match(line) or (not kept and line[:1] in b" \t"):
            break
        kept.append(line + b"\r\n")
    return b"".join(kept)


def _transfer_encoding(body: bytes, *, allow_8bit: bool) -> tuple[str, bytes]:
    plain = b"\0" not in body and all(len(line) <= 998 for line in body.split(b"\r\n"))
    if plain and body.isascii():
        return "7bit", body
    if plain and allow_8bit and _is_utf8(body):
        return "8bit", body
    # Legal for text/rfc822-headers and message/global-headers alike (RFC 6522, RFC 6533).
    return "quoted-printable", binascii.b2a_qp(body, istext=True)


def _boundary(bodies: Iterator[bytes]) -> str:
    # "=_" cannot occur in quoted-printable; the random part makes a clash elsewhere unlikely,
    # and the check makes it impossible.
    texts = list(bodies)
    while True:
        boundary = f"=_{secrets.token_hex(16)}"
        if not any(boundary.encode("ascii") in text for text in texts):
            return boundary


def _field(name: str, value: str) -> str:
    """``Name: value`` and CRLF, folded at spaces (RFC 5322 section 2.2.3)."""
    lines = [f"{name}:"]
    for word in value.split(" "):
        size = _LONGEST_WORD if word.isascii() else _LONGEST_WORD // 4
        for piece in (word[i:i + size] for i in range(0, len(word), size)):
            if len(lines[-1]) + 1 + len(piece) > _FOLD_AT and lines[-1] != f"{name}:":
                lines.append("")
            lines[-1] += f" {piece}"
    return "\r\n".join(lines) + "\r\n"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _text(text: str) -> str:
    return _escape(_one_line(text), _NOT_LITERAL_UTF8)


def _escape(text: str, pattern: re.Pattern[str]) -> str:
    """Each character ``pattern`` matches as RFC 6533's ``\\x{HEX}``."""
    return pattern.sub(lambda m: f"\\x{{{ord(m.group()):X}}}", text)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _require_aware(when: datetime | None) -> None:
    if when is not None and when.utcoffset() is None:
        raise ValueError(f"{when!r} has no time zone")
