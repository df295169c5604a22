"""Parsing MAIL FROM / RCPT TO arguments: RFC 5321 paths and ESMTP parameters.

Only syntax lives here; what is allowed (size, SMTPUTF8) is decided by the protocol module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# RFC 5321 4.5.3.1: local part 64 octets, domain 255, path 256 (with the angle brackets).
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_STRING = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")
_QUOTED = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"')
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_PARAM_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")


class AddressError(ValueError):
    """A syntactically bad path; ``reply`` is the SMTP reply to send."""

    def __init__(self, reply: str):
        super().__init__(reply)
        self.reply = reply


@dataclass(frozen=True)
class ParsedPath:
    address: str          # "" for the null path; local@domain with the domain in A-labels
    params: dict[str, str | None]
    non_ascii: bool       # the address has UTF-8 characters (needs SMTPUTF8)


def parse_command_path(arg: str | None, keyword: str, *, strict: bool = True,
                       allow_null: bool = False) -> ParsedPath:
    """Parse ``FROM:<addr> PARAMS`` (keyword ``FROM:``) or ``TO:<addr> PARAMS``."""
    if not arg or arg[: len(keyword)].upper() != keyword:
        raise _syntax_error(keyword)
    rest = arg[len(keyword):].lstrip(" ")
    if rest.startswith("<"):
        end = _closing_bracket(rest)
        if end < 0:
            raise _syntax_error(keyword)
        inner, tail = rest[1:end], rest[end + 1:]
        if tail and not tail.startswith(" "):
            raise _syntax_error(keyword)
        if end + 1 > MAX_PATH:
            raise AddressError("501 5.1.3 Path too long (RFC 5321 allows 256 octets)")
    elif strict:
        raise AddressError("501 5.5.4 Syntax: the address must be in angle brackets")
    else:
        inner, _, tail = rest.partition(" ")
    params = parse_params(tail)
    if inner == "":
        if not allow_null:
            raise AddressError("501 5.1.3 An empty address is not allowed here")
        return ParsedPath("", params, False)
    if inner.startswith("@"):  # obsolete source route: "@a,@b:user@c" (RFC 5321 C)
        route, sep, inner = inner.partition(":")
        if not sep:
            raise _syntax_error(keyword)
    address, non_ascii = normalise_mailbox(inner, allow_postmaster=keyword == "TO:")
    return ParsedPath(address, params, non_ascii)


def _syntax_error(keyword: str) -> AddressError:
    return AddressError(f"501 5.5.4 Syntax: {'MAIL FROM' if keyword == 'FROM:' else 'RCPT TO'}:<address>")


def _closing_bracket(text: str) -> int:
    in_quotes = escaped = False
    for i, ch in enumerate(text[1:], 1):
        if escaped:
            escaped = False
        elif ch == "\\" and in_quotes:
            escaped = True
        elif ch == '"':
            in_quotes = not in_quotes
        elif ch == ">" and not in_quotes:
            return i
    return -1


def normalise_mailbox(mailbox: str, *, allow_postmaster: bool = False) -> tuple[str, bool]:
    """Validate ``local@domain`` and return it with the domain as A-labels (IDNA), as E-MailRelay
    stores it, plus whether any UTF-8 remains (the local part, or a U-label domain)."""
    if allow_postmaster and mailbox.lower() == "postmaster":
        return "postmaster", False  # RFC 5321 4.1.1.3: <Postmaster> without a domain
    local, at, domain = mailbox.rpartition("@")
    if not at or not local or not domain:
        raise AddressError("501 5.1.3 Bad address syntax: expected local-part@domain")
    if len(local.encode("utf-8")) > MAX_LOCAL_PART:
        raise AddressError("501 5.1.3 Local part too long (RFC 5321 allows 64 octets)")
    non_ascii = not mailbox.isascii()
    if not _valid_local(local):
        raise AddressError("501 5.1.3 Bad address syntax in the local part")
    domain_ascii = _domain_to_ascii(domain)
    if len(domain_ascii) > MAX_DOMAIN:
        raise AddressError("501 5.1.3 Domain too long (RFC 5321 allows 255 octets)")
    return f"{local}@{domain_ascii}", non_ascii


def _valid_local(local: str) -> bool:
    if local.startswith('"'):
        return bool(_QUOTED.fullmatch(local)) or (not local.isascii() and local.endswith('"'))
    if local.isascii():
        return bool(_DOT_STRING.fullmatch(local))
    # RFC 6531: UTF-8 characters are atext too; keep the dot rules, refuse controls and specials.
    return (not any(ord(c) < 0x20 or c in ' "(),:;<>@[\\]' or ord(c) == 0x7F for c in local)
            and not local.startswith(".") and not local.endswith(".") and ".." not in local)


def _domain_to_ascii(domain: str) -> str:
    if domain.startswith("[") and domain.endswith("]"):  # address literal
        if not re.fullmatch(r"\[(?:IPv6:[0-9A-Fa-f:.]+|[0-9.]+)\]", domain):
            raise AddressError("501 5.1.3 Bad address literal")
        return domain
    try:
        ascii_domain = domain.encode("idna").decode("ascii") if not domain.isascii() else domain
    except UnicodeError:
        raise AddressError("501 5.1.3 Bad internationalised domain name") from None
    labels = ascii_domain.rstrip(".").split(".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        raise AddressError("501 5.1.3 Bad domain syntax")
    return ascii_domain


def parse_params(text: str) -> dict[str, str | None]:
    """``SIZE=100 BODY=8BITMIME SMTPUTF8`` to ``{"SIZE": "100", "BODY": "8BITMIME", "SMTPUTF8": None}``."""
    params: dict[str, str | None] = {}
    for token in text.split():
        key, eq, value = token.partition("=")
        if not _PARAM_KEY.fullmatch(key) or (eq and not value):
            raise AddressError(f"501 5.5.4 Bad parameter syntax: {token[:40]}")
        key = key.upper()
        if key in params:
            raise AddressError(f"501 5.5.4 Parameter {key} given twice")
        params[key] = value if eq else None
    return params
