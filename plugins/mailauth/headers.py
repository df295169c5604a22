"""The header section of a spooled message as raw fields: find, remove and prepend fields without
touching a byte of anything else (a DKIM signature covers those bytes)."""

from __future__ import annotations

import email.utils
import re
from dataclasses import dataclass

_FIELD_NAME = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")
# The usual forms, "Plain Name <a@b.c>" and "a@b.c", read without the full address parser.
_LOCAL, _DOMAIN = rb"[A-Za-z0-9._%+=-]+@", rb"([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+)"
_SIMPLE_FROM = re.compile(rb"[ \t]*(?:(?:[A-Za-z0-9][A-Za-z0-9 \t.'-]*)?<" + _LOCAL + _DOMAIN + rb">|"
                          + _LOCAL + _DOMAIN + rb")[ \t]*")


@dataclass(frozen=True)
class Field:
    """One header field: its name (lower case) and its raw bytes, continuation lines and CRLF included."""

    name: bytes
    raw: bytes

    @property
    def value(self) -> bytes:
        """The value after the colon, unfolded (CRLF before white space removed), not stripped."""
        value = self.raw.split(b":", 1)[1] if b":" in self.raw else b""
        return value.replace(b"\r\n", b"").replace(b"\n", b"")


def split(content: bytes) -> tuple[list[Field], bytes]:
    """The header fields and the rest (the empty line and the body, ``b""`` when there is none).

    A line that is not a field (no name and colon) is kept as a field named ``b""``, so that
    joining the fields and the rest gives the content back unchanged.
    """
    end = content.find(b"\r\n\r\n")
    if content.startswith(b"\r\n"):
        return [], content
    head, rest = (content, b"") if end < 0 else (content[:end + 2], content[end + 2:])
    fields: list[Field] = []
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            last = fields[-1]
            fields[-1] = Field(last.name, last.raw + line)
            continue
        match = _FIELD_NAME.match(line)
        fields.append(Field(match.group(1).lower() if match else b"", line))
    return fields, rest


def join(fields: list[Field], rest: bytes) -> bytes:
    return b"".join(f.raw for f in fields) + rest


def header_section_has(content: bytes, name: bytes) -> bool:
    """A cheap test before a split: does the header section mention ``name`` (lower case) at all?"""
    end = content.find(b"\r\n\r\n")
    return name in (content if end < 0 else content[:end]).lower()


def from_domains(fields: list[Field]) -> tuple[list[str], int]:
    """The domains of the ``From:`` addresses (lower case, A-labels where convertible) and the
    number of ``From:`` fields. An address without a domain yields ``""``."""
    found = [f for f in fields if f.name == b"from"]
    domains: list[str] = []
    for field in found:
        simple = _SIMPLE_FROM.fullmatch(field.value)
        if simple is not None:  # "Name <a@b>" or "a@b": the usual forms, without the full parser
            domain = (simple.group(1) or simple.group(2)).decode("ascii").lower()
            if domain not in domains:
                domains.append(domain)
            continue
        text = field.value.decode("utf-8", "replace")
        for _, address in email.utils.getaddresses([text]):
            if not address:
                continue
            domain = address.rpartition("@")[2].strip().rstrip(".").lower() if "@" in address else ""
            if domain and not domain.isascii():
                try:
                    domain = domain.encode("idna").decode("ascii")
                except UnicodeError:
                    domain = ""
            if domain not in domains:
                domains.append(domain)
    return domains, len(found)
