"""The ``Received:`` trace header (RFC 5321 4.4) and mail-loop detection."""

from __future__ import annotations

import email.utils
import ipaddress
import re
import time
from datetime import datetime

from ..types import Session

_RECEIVED = re.compile(rb"(?im)^received[ \t]*:")


def protocol_keyword(session: Session, smtputf8: bool) -> str:
    """RFC 3848 / RFC 6531 ``with`` keyword: SMTP, ESMTP, ESMTPS, ESMTPA, ESMTPSA, UTF8SMTP..."""
    if not session.esmtp:
        return "SMTP"
    base = "UTF8SMTP" if smtputf8 else "ESMTP"
    return base + ("S" if session.tls else "") + ("A" if session.auth_user else "")


def _printable(text: str) -> str:
    # A HELO argument or cipher name goes into a header: printable ASCII, no spaces or parens.
    return "".join(c if 0x21 <= ord(c) <= 0x7E and c not in "()" else "-" for c in text)[:255] or "unknown"


def _address_literal(ip: str) -> str:
    try:
        addr = ipaddress.ip_address(ip.split("%")[0])
    except ValueError:
        return "[unix]"
    return f"[IPv6:{addr.compressed}]" if addr.version == 6 else f"[{addr}]"


def received_header(session: Session, domain: str, message_id: str, smtputf8: bool,
                    now: datetime | None = None) -> bytes:
    """``Received: from HELO ([ip]) by DOMAIN with PROTO [tls CIPHER] id ID ; DATE`` + CRLF."""
    parts = [f"Received: from {_printable(session.helo)} ({_address_literal(session.peer_ip)})",
             f"by {_printable(domain)}", f"with {protocol_keyword(session, smtputf8)}"]
    if session.tls and session.tls_cipher:
        parts.append(f"tls {_printable(session.tls_cipher).replace('-', '_')}")
    parts.append(f"id {message_id}")
    line = " ".join(parts)
    date = email.utils.format_datetime(now) if now is not None else _date_now()
    # Fold before the date so the header stays well under 998 octets and readable.
    return f"{line} ;\r\n\t{date}\r\n".encode("ascii")


_date_cache: tuple[int, str] = (-1, "")


def _date_now() -> str:
    """RFC 5322 date-time of this second, local offset; formatted once a second, not per message."""
    global _date_cache
    second = int(time.time())
    if _date_cache[0] != second:
        _date_cache = (second, email.utils.format_datetime(datetime.fromtimestamp(second).astimezone()))
    return _date_cache[1]


def count_hops(content: bytes) -> int:
    """Number of ``Received:`` headers in the header section of ``content``."""
    end = content.find(b"\r\n\r\n")
    head = content if end < 0 else content[: end + 2]
    return len(_RECEIVED.findall(head))
