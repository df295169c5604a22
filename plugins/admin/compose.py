"""``POST /api/v1/messages`` with JSON: an RFC 5322 message built with the standard library.

    {"from": "App <app@example.com>", "to": ["a@example.net"], "cc": [], "bcc": [],
     "subject": "Hello", "text": "plain body", "html": "<p>html body</p>",
     "headers": {"X-Campaign": "42"},
     "attachments": [{"filename": "a.pdf", "content_type": "application/pdf", "content": "<base64>"}]}

The envelope sender is the address in ``from``; the recipients are every address in ``to``,
``cc`` and ``bcc`` (``bcc`` never appears in the message). ``Date`` and ``Message-ID`` are set
unless ``headers`` gives them. The email package encodes what needs encoding (RFC 2047 words,
quoted-printable or base64 bodies, MIME structure) and refuses header values with line breaks,
so a JSON field cannot inject a header.
"""

from __future__ import annotations

import base64
import binascii
import email.parser
import email.policy
import email.utils
import re
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any

_HEADER_NAME = re.compile(r"[!-9;-~]{1,76}")  # RFC 5322 ftext
#: Set from their own fields or by the MIME structure, never through "headers".
_RESERVED = {"from", "to", "cc", "bcc", "subject", "content-type", "content-transfer-encoding", "mime-version"}


class ComposeError(ValueError):
    """The JSON does not describe a message; the text says which field is wrong."""


@dataclass(frozen=True)
class Composed:
    sender: str
    recipients: list[str]
    content: bytes


def _text(data: dict[str, Any], key: str) -> str:
    value = data.get(key, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ComposeError(f"{key}: expected a string")
    return value


def _addresses(data: dict[str, Any], key: str) -> list[str]:
    """The field as written (a string or a list of strings), one item per address."""
    value = data.get(key) or []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise ComposeError(f"{key}: expected an address or a list of addresses")
    out = []
    for name, address in email.utils.getaddresses(items):
        if "@" not in address or any(c in address for c in " \r\n\t<>"):
            raise ComposeError(f"{key}: {address or items!r} is not an address")
        out.append(email.utils.formataddr((name, address)) if name else address)
    return out


def _bare(formatted: str) -> str:
    return email.utils.parseaddr(formatted)[1]


def compose(data: Any, domain: str) -> Composed:
    """Build the message; :class:`ComposeError` says what is wrong with ``data``."""
    if not isinstance(data, dict):
        raise ComposeError("expected a JSON object")
    unknown = set(data) - {"from", "to", "cc", "bcc", "subject", "text", "html", "headers", "attachments"}
    if unknown:
        raise ComposeError(f"unknown field {sorted(unknown)[0]!r}")
    senders = _addresses(data, "from")
    if len(senders) != 1:
        raise ComposeError("from: expected exactly one address")
    to, cc, bcc = _addresses(data, "to"), _addresses(data, "cc"), _addresses(data, "bcc")
    if not to + cc + bcc:
        raise ComposeError("to: give at least one recipient (to, cc or bcc)")
    everything = senders + to + cc + bcc
    policy = email.policy.SMTP if all(a.isascii() for a in everything) else email.policy.SMTPUTF8
    message = EmailMessage(policy=policy)
    headers = data.get("headers") or {}
    if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
        raise ComposeError("headers: expected an object of header names and string values")
    try:
        message["From"] = senders[0]
        if to:
            message["To"] = ", ".join(to)
        if cc:
            message["Cc"] = ", ".join(cc)
        message["Subject"] = _text(data, "subject")
        given = {name.lower() for name in headers}
        if "date" not in given:
            message["Date"] = email.utils.formatdate(localtime=True)
        if "message-id" not in given:
            message["Message-ID"] = email.utils.make_msgid(domain=domain)
        for name, value in headers.items():
            if not _HEADER_NAME.fullmatch(name) or name.lower() in _RESERVED:
                raise ComposeError(f"headers: {name!r} cannot be set here"
                                   + (" (use its own field)" if name.lower() in _RESERVED else ""))
            message[name] = value
        text, html = _text(data, "text"), _text(data, "html")
        if html and not text:
            message.set_content(html, subtype="html")
        else:
            message.set_content(text)
            if html:
                message.add_alternative(html, subtype="html")
        for filename, content_type, payload in _attachments(data):
            if content_type == "message/rfc822":  # RFC 2046 5.2.1: never base64; attach it parsed
                inner = email.parser.BytesParser(policy=policy).parsebytes(payload)
                message.add_attachment(inner, filename=filename)
            else:
                maintype, _, subtype = content_type.partition("/")
                message.add_attachment(payload, maintype=maintype, subtype=subtype, filename=filename)
        content = message.as_bytes(policy=policy)
    except ValueError as e:  # e.g. a line break in a header value
        if isinstance(e, ComposeError):
            raise
        raise ComposeError(f"cannot build the message: {e}") from None
    return Composed(_bare(senders[0]), [_bare(a) for a in to + cc + bcc], content)


def _attachments(data: dict[str, Any]) -> list[tuple[str, str, bytes]]:
    items = data.get("attachments") or []
    if not isinstance(items, list):
        raise ComposeError("attachments: expected a list")
    out = []
    for i, item in enumerate(items):
        where = f"attachments[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("content"), str):
            raise ComposeError(f"{where}: expected {{\"filename\", \"content_type\", \"content\" (base64)}}")
        filename = item.get("filename") or "attachment"
        content_type = item.get("content_type") or "application/octet-stream"
        if not isinstance(filename, str) or not isinstance(content_type, str) or not re.fullmatch(
                r"[A-Za-z0-9][\w.+-]*/[A-Za-z0-9][\w.+-]*", content_type):
            raise ComposeError(f"{where}: filename and content_type must be strings (content_type like text/csv)")
        if content_type.lower().startswith("multipart/") or (
                content_type.lower().startswith("message/") and content_type.lower() != "message/rfc822"):
            raise ComposeError(f"{where}: content_type cannot be {content_type} (attach as application/octet-stream)")
        try:
            content = base64.b64decode(item["content"], validate=True)
        except (binascii.Error, ValueError):
            raise ComposeError(f"{where}: content is not base64") from None
        out.append((filename, content_type.lower(), content))
    return out
