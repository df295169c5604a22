"""Local submission: a message from a program on this host, written straight into the spool.

``relay submit`` (E-MailRelay's ``emailrelay-submit``) and ``relay-sendmail`` use this; the daemon
need not run. The message is written the way an SMTP message is (content and envelope flushed,
renamed into place, the directory flushed: :meth:`Spool.write` with ``commit=True``), after the
checks SMTP makes that need no session: address syntax, at least one recipient, the size limit
(``[smtp] size``) and the hop count. Plugin policies and server filters need the daemon; they do
not run here (as with ``emailrelay-submit``): the pickup directory and the JSON API run them.

A running relay forwards the message at its next scan of the spool: within ``[queue] rescan``
seconds (default 60), or ``--poll`` seconds.
"""

from __future__ import annotations

import asyncio
import email.utils
import getpass
import os
import re
from dataclasses import dataclass
from datetime import datetime
from email.parser import BytesHeaderParser
from email.policy import SMTPUTF8
from pathlib import Path

from .config.settings import Settings
from .smtp.addresses import AddressError, normalise_mailbox
from .smtp.received import count_hops
from .spool import Envelope, Spool, SpoolError
from .types import Recipient

__all__ = ["HeaderEnvelope", "SubmissionError", "complete_headers", "envelope_from_headers",
           "local_sender", "strip_fields", "submit"]

# sysexits.h: what sendmail-compatible programs exit with.
EX_USAGE, EX_DATAERR, EX_NOUSER, EX_UNAVAILABLE, EX_SOFTWARE = 64, 65, 67, 69, 70
EX_CANTCREAT, EX_IOERR, EX_TEMPFAIL, EX_NOPERM, EX_CONFIG = 73, 74, 75, 77, 78

_FIELD = re.compile(rb"^([!-9;-~]+)[ \t]*:", re.MULTILINE)


class SubmissionError(Exception):
    """The message was not written; ``exit_code`` is the sysexits.h status that says why."""

    def __init__(self, message: str, exit_code: int = EX_DATAERR):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class HeaderEnvelope:
    """An envelope taken from a message's header section (``sender`` ``""`` when none named one)."""

    sender: str
    recipients: list[str]


def crlf(content: bytes) -> bytes:
    """Bare LF or CR to CRLF, and a final line end, as an SMTP client would send it."""
    content = re.sub(rb"\r\n|\r|\n", b"\r\n", content)
    return content if content.endswith(b"\r\n") or not content else content + b"\r\n"


def _split(content: bytes) -> tuple[bytes, bytes]:
    """(header section without its blank line, the rest including the blank line)."""
    if content.startswith(b"\r\n"):
        return b"", content
    end = content.find(b"\r\n\r\n")
    return (content, b"") if end < 0 else (content[: end + 2], content[end + 2:])


def _fields(head: bytes) -> list[tuple[str, bytes]]:
    """The header section as (lower-case name, raw field with continuation lines)."""
    out: list[tuple[str, bytes]] = []
    if not head:
        return out
    for line in head.split(b"\r\n")[:-1] if head.endswith(b"\r\n") else head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and out:
            name, raw = out[-1]
            out[-1] = (name, raw + b"\r\n" + line)
        else:
            out.append((line.split(b":", 1)[0].strip().lower().decode("ascii", "replace"), line))
    return out


def looks_like_a_message(content: bytes) -> bool:
    """The first line is a header field (``Name: value``): RFC 5322, not stray data."""
    return bool(_FIELD.match(content))


def strip_fields(content: bytes, names: set[str]) -> bytes:
    """Remove every header field named in ``names`` (lower case) with its continuation lines."""
    head, rest = _split(content)
    kept = [raw for name, raw in _fields(head) if name not in names]
    return b"".join(raw + b"\r\n" for raw in kept) + rest


def envelope_from_headers(content: bytes, *, use_return_path: bool = True) -> HeaderEnvelope:
    """Sender from ``Return-Path``, ``Sender`` or ``From`` (the first that names one); recipients
    from ``To``, ``Cc`` and ``Bcc``, in order, without duplicates. Raises :class:`SubmissionError`
    for a header section that cannot be parsed."""
    head, _ = _split(content)
    try:
        message = BytesHeaderParser(policy=SMTPUTF8).parsebytes(head + b"\r\n")
        sender = ""
        for name in (("return-path",) if use_return_path else ()) + ("sender", "from"):
            addresses = [a for _, a in email.utils.getaddresses([str(v) for v in message.get_all(name, [])]) if a]
            if addresses or (name == "return-path" and message.get(name, "").strip() == "<>"):
                sender = addresses[0] if addresses else ""
                break
        recipients: list[str] = []
        for name in ("to", "cc", "bcc"):
            for _, address in email.utils.getaddresses([str(v) for v in message.get_all(name, [])]):
                if address and address not in recipients:
                    recipients.append(address)
    except Exception as e:  # the stdlib's header parser has raised odd errors on garbage before
        raise SubmissionError(f"the header section cannot be parsed: {type(e).__name__}: {e}", EX_DATAERR) from None
    return HeaderEnvelope(sender, recipients)


def has_field(content: bytes, name: str) -> bool:
    head, _ = _split(content)
    return any(field == name for field, _ in _fields(head))


def complete_headers(content: bytes, *, sender: str, full_name: str = "", domain: str,
                     add_date: bool = True, add_message_id: bool = True, add_from: bool = True) -> bytes:
    """Add ``From``, ``Date`` and ``Message-ID`` where the message has none (what sendmail does
    for local programs; RFC 5322 requires From and Date)."""
    added = []
    if add_from and not has_field(content, "from") and sender:
        added.append(b"From: " + (email.utils.formataddr((full_name, sender)) if full_name else sender).encode())
    if add_date and not has_field(content, "date"):
        added.append(b"Date: " + email.utils.formatdate(localtime=True).encode())
    if add_message_id and not has_field(content, "message-id"):
        added.append(b"Message-ID: " + email.utils.make_msgid(domain=domain).encode())
    head, rest = _split(content)
    if not rest:  # no header/body separator: the whole input was headers
        rest = b"\r\n"
    return head + b"".join(line + b"\r\n" for line in added) + rest


def local_sender(domain: str) -> str:
    """The submitting user's address: login name at the relay's domain (as sendmail does)."""
    try:
        login = getpass.getuser()
    except (KeyError, OSError):
        login = f"uid{os.getuid()}"
    return f"{login}@{domain}"


def qualify(address: str, domain: str) -> str:
    """A bare local name (``root``, cron's ``MAILTO=admin``) gets the relay's domain."""
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1].strip()
    return address if "@" in address or not address else f"{address}@{domain}"


def _received(domain: str, message_id: str, tool: str) -> bytes:
    date = email.utils.format_datetime(datetime.now().astimezone())
    return (f"Received: by {domain} (mailrelay {tool}, from userid {os.getuid()})\r\n"
            f"\tid {message_id} ; {date}\r\n").encode("ascii")


def _check(settings: Settings, sender: str, recipients: list[str], content: bytes) -> tuple[str, list[str], bool]:
    if not recipients:
        raise SubmissionError("no recipients: a message needs at least one", EX_USAGE)
    try:
        address, non_ascii = normalise_mailbox(sender) if sender else ("", False)
    except AddressError as e:
        raise SubmissionError(f"sender <{sender}>: {e.reply[4:]}", EX_DATAERR) from None
    checked: list[str] = []
    for raw in recipients:
        try:
            rcpt, rcpt_non_ascii = normalise_mailbox(raw, allow_postmaster=True)
        except AddressError as e:
            raise SubmissionError(f"recipient <{raw}>: {e.reply[4:]}", EX_NOUSER) from None
        non_ascii |= rcpt_non_ascii
        if rcpt not in checked:
            checked.append(rcpt)
    size = settings.smtp.size
    if size and len(content) > size:
        raise SubmissionError(f"message of {len(content)} octets exceeds the size limit of {size} octets",
                              EX_DATAERR)
    if count_hops(content) + 1 > settings.smtp.max_hops:
        raise SubmissionError("too many Received: headers: a mail loop", EX_DATAERR)
    return address, checked, non_ascii


async def _write(spool: Spool, envelope: Envelope, content: bytes, tool: str, domain: str) -> str:
    spool.open()
    try:
        message_id = spool.new_id()
        await spool.write(message_id, envelope, [_received(domain, message_id, tool), content], commit=True)
        return message_id
    finally:
        spool.close()


def submit(settings: Settings, sender: str, recipients: list[str], content: bytes, *,
           tool: str = "submit") -> str:
    """Check and write one message into the configured spool, durably; return its spool id.

    ``content`` is normalised to CRLF; ``tool`` names the program in the ``Received:`` header.
    Raises :class:`SubmissionError` (with a sysexits.h code) when the message is refused or
    cannot be written.
    """
    content = crlf(content)
    address, checked, non_ascii = _check(settings, sender, recipients, content)
    directory = Path(settings.spool.dir)
    if not directory.is_dir():
        raise SubmissionError(f"spool directory {directory} does not exist (give --spool-dir or --config, "
                              "or start the relay once)", EX_CONFIG)
    if not os.access(directory, os.W_OK | os.X_OK):
        raise SubmissionError(f"spool directory {directory} is not writable by this user", EX_CANTCREAT)
    envelope = Envelope(sender=address, recipients=tuple(Recipient(r) for r in checked),
                        content="7bit" if content.isascii() else "8bit", client="127.0.0.1",
                        utf8_mailbox_names=non_ascii)
    spool = Spool(directory, durable=settings.spool.durability == "fsync", sync_method=settings.spool.sync_method)
    try:
        return asyncio.run(_write(spool, envelope, content, tool, settings.server.effective_domain()))
    except SpoolError as e:
        raise SubmissionError(str(e), EX_TEMPFAIL if e.disk_full else EX_CANTCREAT) from None
