"""E-MailRelay's envelope file: ``X-MailRelay-<Field>: value`` lines, CRLF, in a fixed order.

Files written here are byte-compatible with E-MailRelay 2.6 (every field written, empty ones as
``Name: `` with a trailing space); files written by E-MailRelay, older formats included, parse.
Fields this module does not know are kept and written back unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Iterable, Literal

from ..types import Recipient

FORMAT = "#2821.8"
PREFIX = "X-MailRelay-"

ContentType = Literal["7bit", "8bit", "unknown"]


class EnvelopeError(ValueError):
    """An envelope file that cannot be read: names the file and the problem."""


@dataclass(frozen=True)
class Envelope:
    """One message's envelope. Text fields hold decoded values (no xtext)."""

    sender: str
    recipients: tuple[Recipient, ...]
    content: ContentType = "unknown"
    authentication: str = ""
    client: str = ""
    client_certificate: str = ""
    mail_from_auth_in: str = ""
    mail_from_auth_out: str = ""
    forward_to: str = ""
    forward_to_address: str = ""
    client_account_selector: str = ""
    utf8_mailbox_names: bool = False
    format: str = FORMAT
    reason: str = ""
    reason_code: str = ""
    extra: tuple[tuple[str, str], ...] = field(default=())

    @property
    def remote_recipients(self) -> tuple[Recipient, ...]:
        return tuple(r for r in self.recipients if not r.is_local)

    @property
    def local_recipients(self) -> tuple[Recipient, ...]:
        return tuple(r for r in self.recipients if r.is_local)

    def with_reason(self, reason: str, code: int | str = "") -> "Envelope":
        """A copy marked as failed (what goes into ``.envelope.bad``)."""
        return replace(self, reason=reason.replace("\r", " ").replace("\n", " "),
                       reason_code=str(code))

    def to_bytes(self) -> bytes:
        """Serialise in E-MailRelay's field order with CRLF line ends."""
        lines = [
            ("Format", self.format),
            ("Content", self.content),
            ("From", self.sender),
            ("ToCount", str(len(self.recipients))),
        ]
        for r in self.recipients:
            lines.append(("To-Local", r.mailbox) if r.mailbox is not None else ("To-Remote", r.address))
        lines += [
            ("Authentication", xtext_encode(self.authentication)),
            ("Client", self.client),
            ("ClientCertificate", _fold(self.client_certificate)),
            ("MailFromAuthIn", xtext_encode(self.mail_from_auth_in)),
            ("MailFromAuthOut", xtext_encode(self.mail_from_auth_out)),
            ("ForwardTo", self.forward_to),
            ("ForwardToAddress", self.forward_to_address),
            ("ClientAccountSelector", self.client_account_selector),
            ("Utf8MailboxNames", "1" if self.utf8_mailbox_names else "0"),
        ]
        lines += list(self.extra)
        lines.append(("End", "1"))
        if self.reason or self.reason_code:
            lines += [("Reason", self.reason), ("ReasonCode", self.reason_code)]
        for name, value in lines:
            _check_value(name, value)
        return "".join(f"{PREFIX}{n}: {v}\r\n" for n, v in lines).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str = "<envelope>") -> "Envelope":
        """Parse an envelope written by us or by E-MailRelay."""
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise EnvelopeError(f"{source}: not UTF-8 ({e})") from None
        fields: list[tuple[str, str]] = []
        for lineno, raw in enumerate(text.split("\n"), 1):
            line = raw[:-1] if raw.endswith("\r") else raw
            if not line:
                continue
            if line[0] in " \t" and fields:  # folded continuation (client certificate PEM)
                name, value = fields[-1]
                fields[-1] = (name, value + "\n" + line[1:])
                continue
            if not line.startswith(PREFIX) or ":" not in line:
                raise EnvelopeError(f"{source}:{lineno}: not an envelope line: {line[:60]!r}")
            name, _, value = line[len(PREFIX):].partition(":")
            fields.append((name, value[1:] if value.startswith(" ") else value))
        return cls._from_fields(fields, source)

    @classmethod
    def _from_fields(cls, fields: Iterable[tuple[str, str]], source: str) -> "Envelope":
        known: dict[str, str] = {}
        recipients: list[Recipient] = []
        extra: list[tuple[str, str]] = []
        ended = False
        for name, value in fields:
            if name == "To-Remote":
                recipients.append(Recipient(value))
            elif name == "To-Local":
                recipients.append(Recipient(value, mailbox=value))
            elif name == "End":
                ended = True
            elif name == "Committed":
                continue  # the commit marker (commit_marker.py): not part of the envelope
            elif name in _KNOWN:
                known[name] = value
            else:
                extra.append((name, value))
        if not known.get("Format", "").startswith("#2821."):
            raise EnvelopeError(f"{source}: missing or unknown Format field")
        if not ended:
            raise EnvelopeError(f"{source}: no End field (incomplete envelope)")
        if "From" not in known:
            raise EnvelopeError(f"{source}: no From field")
        count = known.get("ToCount")
        if count is not None and (not count.isdigit() or int(count) != len(recipients)):
            raise EnvelopeError(f"{source}: ToCount {count} but {len(recipients)} recipients")
        content = known.get("Content", "unknown")
        if content not in ("7bit", "8bit", "unknown"):
            content = "unknown"
        return cls(
            sender=known["From"],
            recipients=tuple(recipients),
            content=content,  # type: ignore[arg-type]
            authentication=xtext_decode(known.get("Authentication", "")),
            client=known.get("Client", ""),
            client_certificate=known.get("ClientCertificate", ""),
            mail_from_auth_in=xtext_decode(known.get("MailFromAuthIn", "")),
            mail_from_auth_out=xtext_decode(known.get("MailFromAuthOut", "")),
            forward_to=known.get("ForwardTo", ""),
            forward_to_address=known.get("ForwardToAddress", ""),
            client_account_selector=known.get("ClientAccountSelector", ""),
            utf8_mailbox_names=known.get("Utf8MailboxNames", "0") == "1",
            format=known["Format"],
            reason=known.get("Reason", ""),
            reason_code=known.get("ReasonCode", ""),
            extra=tuple(extra),
        )


_KNOWN = {
    "Format", "Content", "From", "ToCount", "Authentication", "Client", "ClientCertificate",
    "MailFromAuthIn", "MailFromAuthOut", "ForwardTo", "ForwardToAddress",
    "ClientAccountSelector", "Utf8MailboxNames", "Reason", "ReasonCode",
}


def _check_value(name: str, value: str) -> None:
    # A CR or LF in a value would forge extra envelope fields; only the folded
    # certificate may contain newlines, and _fold() has turned them into continuations.
    if "\r" in name or "\n" in name:
        raise ValueError(f"envelope field name {name!r} contains a line break")
    stripped = value.replace("\r\n ", "") if name == "ClientCertificate" else value
    if "\r" in stripped or "\n" in stripped:
        raise ValueError(f"envelope field {name} contains a line break")


def _fold(text: str) -> str:
    lines = text.strip().splitlines()
    return "\r\n ".join(lines)


_XTEXT_SAFE = re.compile(r"[!-*,-<>-~]")  # RFC 3461: 33..126 except '+' and '='


def xtext_encode(text: str) -> str:
    """RFC 3461 xtext, as E-MailRelay uses for the Authentication field."""
    out = []
    for ch in text:
        if _XTEXT_SAFE.fullmatch(ch):
            out.append(ch)
        else:
            out.extend(f"+{b:02X}" for b in ch.encode("utf-8"))
    return "".join(out)


def xtext_decode(text: str) -> str:
    """Inverse of :func:`xtext_encode`; malformed escapes are kept literally."""
    raw = bytearray()
    i = 0
    while i < len(text):
        if text[i] == "+" and re.fullmatch(r"[0-9A-Fa-f]{2}", text[i + 1:i + 3]):
            raw.append(int(text[i + 1:i + 3], 16))
            i += 3
        else:
            raw.extend(text[i].encode("utf-8"))
            i += 1
    return raw.decode("utf-8", errors="replace")
