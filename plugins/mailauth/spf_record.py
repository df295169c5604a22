"""SPF records (RFC 7208 sections 4.6, 5, 6 and 12): parsing into terms, and macro expansion (7).

A record with any syntax error anywhere is a ``permerror`` before anything is evaluated
(section 4.6), so :func:`parse` checks the whole record, every domain-spec included.
"""

from __future__ import annotations

import ipaddress
import re
import time
import urllib.parse
from dataclasses import dataclass, field

MECHANISMS = ("all", "include", "a", "mx", "ptr", "ip4", "ip6", "exists")
QUALIFIERS = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}
_VERSION = re.compile(r"v=spf1(?: |$)", re.IGNORECASE)
_MODIFIER_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")
_MACRO = re.compile(r"%(?:\{([A-Za-z])(\d*)(r?)([.\-+,/_=]*)\}|[%_-])")
_CIDR4 = re.compile(r"/(0|[1-9]\d?)")
_CIDR6 = re.compile(r"//(0|[1-9]\d{0,2})")
_DUAL_CIDR = re.compile(r"^(.*?)((?:/(?:0|[1-9]\d?))?(?://(?:0|[1-9]\d{0,2}))?)$", re.DOTALL)
_TOPLABEL = re.compile(r"(?=[A-Za-z0-9-]*[A-Za-z])[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")


class SpfSyntaxError(ValueError):
    """The record is broken: the result is ``permerror``."""


@dataclass(frozen=True)
class Term:
    """A directive (``qualifier`` + mechanism) or a modifier (``qualifier`` is ``""``)."""

    name: str                   # lower case: "a", "mx", "include", ..., or the modifier's name
    qualifier: str = ""         # "pass", "fail", "softfail", "neutral" for mechanisms
    domain_spec: str = ""       # unexpanded; "" when the mechanism has none
    network: str = ""           # ip4/ip6: the address or network as written
    cidr4: int = 32
    cidr6: int = 128
    modifier: bool = False


@dataclass(frozen=True)
class Record:
    directives: tuple[Term, ...]
    redirect: str = ""          # unexpanded domain-spec
    explanation: str = ""       # exp=, unexpanded domain-spec
    extra: tuple[Term, ...] = field(default=())   # unknown modifiers (ignored)


def select(records: list[bytes]) -> str | None:
    """The SPF record among a name's TXT records: ``None`` when there is none; SpfSyntaxError when
    there are several (section 4.5) or it is not text."""
    found = [r for r in records if _VERSION.match(r.decode("latin-1"))]
    if not found:
        return None
    if len(found) > 1:
        raise SpfSyntaxError("more than one v=spf1 record")
    try:
        return found[0].decode("ascii")
    except UnicodeDecodeError:
        raise SpfSyntaxError("non-ASCII characters in the record") from None


def parse(text: str) -> Record:
    """Parse a record that :func:`select` chose; SpfSyntaxError for any mistake in it."""
    if any(not (0x20 < ord(c) < 0x7F) and c != " " for c in text):
        raise SpfSyntaxError("control or non-ASCII characters in the record")
    terms = text.split(" ")[1:]
    directives: list[Term] = []
    extra: list[Term] = []
    redirect = explanation = None
    for word in (t for t in terms if t):
        modifier = _modifier(word)
        if modifier is not None:
            name, value = modifier
            if name == "redirect":
                if redirect is not None:
                    raise SpfSyntaxError("redirect= given twice")
                redirect = _domain_spec(value, word)
            elif name == "exp":
                if explanation is not None:
                    raise SpfSyntaxError("exp= given twice")
                explanation = _domain_spec(value, word)
            else:
                check_macro_string(value, word)
                extra.append(Term(name, domain_spec=value, modifier=True))
            continue
        directives.append(_directive(word))
    return Record(tuple(directives), redirect or "", explanation or "", tuple(extra))


def _modifier(word: str) -> tuple[str, str] | None:
    name, eq, value = word.partition("=")
    if not eq:
        return None
    if not _MODIFIER_NAME.fullmatch(name):
        # "ip4:1.2.3.4/24" has no "=", but "a:foo=bar" is a mechanism with a strange domain
        if ":" in name or "/" in name:
            return None
        raise SpfSyntaxError(f"{word!r}: not a valid modifier name")
    return name.lower(), value


def _directive(word: str) -> Term:
    qualifier = "pass"
    if word[0] in QUALIFIERS:
        qualifier, word = QUALIFIERS[word[0]], word[1:]
    match = re.match(r"[A-Za-z0-9]+", word)
    name = match.group(0).lower() if match else ""
    if name not in MECHANISMS:
        raise SpfSyntaxError(f"unknown mechanism {word!r}")
    rest = word[len(name):]
    if name == "all":
        if rest:
            raise SpfSyntaxError(f"{word!r}: all takes no argument")
        return Term(name, qualifier)
    if name in ("ip4", "ip6"):
        return _ip_term(name, qualifier, rest, word)
    if name in ("a", "mx"):
        cidr_match = _DUAL_CIDR.match(rest)
        assert cidr_match is not None
        spec, cidr = cidr_match.group(1), cidr_match.group(2)
        cidr4, cidr6 = _dual_cidr(cidr, word)
        if spec and not spec.startswith(":"):
            raise SpfSyntaxError(f"{word!r}: expected ':' after {name}")
        return Term(name, qualifier, _domain_spec(spec[1:], word) if spec else "", cidr4=cidr4, cidr6=cidr6)
    if name == "ptr":
        if rest and not rest.startswith(":"):
            raise SpfSyntaxError(f"{word!r}: expected ':' after ptr")
        return Term(name, qualifier, _domain_spec(rest[1:], word) if rest else "")
    # include and exists need a domain-spec
    if not rest.startswith(":"):
        raise SpfSyntaxError(f"{word!r}: {name} needs ':domain'")
    return Term(name, qualifier, _domain_spec(rest[1:], word))


def _ip_term(name: str, qualifier: str, rest: str, word: str) -> Term:
    if not rest.startswith(":"):
        raise SpfSyntaxError(f"{word!r}: {name} needs ':address'")
    address, slash, length = rest[1:].partition("/")
    limit = 32 if name == "ip4" else 128
    cidr = limit
    if slash:
        if not re.fullmatch(r"0|[1-9]\d{0,2}", length) or int(length) > limit:
            raise SpfSyntaxError(f"{word!r}: bad prefix length")
        cidr = int(length)
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise SpfSyntaxError(f"{word!r}: {address!r} is not an address") from None
    if ip.version != (4 if name == "ip4" else 6):
        raise SpfSyntaxError(f"{word!r}: not an IPv{4 if name == 'ip4' else 6} address")
    return Term(name, qualifier, network=f"{address}/{cidr}")


def _dual_cidr(text: str, word: str) -> tuple[int, int]:
    cidr4, cidr6 = 32, 128
    if not text:
        return cidr4, cidr6
    rest = text
    m4 = _CIDR4.match(rest) if not rest.startswith("//") else None
    if m4:
        cidr4 = int(m4.group(1))
        rest = rest[m4.end():]
    m6 = _CIDR6.fullmatch(rest) if rest else None
    if rest and not m6:
        raise SpfSyntaxError(f"{word!r}: bad prefix length")
    if m6:
        cidr6 = int(m6.group(1))
    if cidr4 > 32 or cidr6 > 128:
        raise SpfSyntaxError(f"{word!r}: prefix length out of range")
    return cidr4, cidr6


def _domain_spec(spec: str, word: str) -> str:
    """Check ``macro-string domain-end`` (section 7.1)."""
    if not spec:
        raise SpfSyntaxError(f"{word!r}: empty domain")
    check_macro_string(spec, word)
    if spec.endswith("}"):  # ends in a macro-expand
        return spec
    labels = spec.rstrip(".") if spec.endswith(".") and not spec.endswith("..") else spec
    top = labels.rsplit(".", 1)
    if len(top) < 2 or not _TOPLABEL.fullmatch(top[1]):
        raise SpfSyntaxError(f"{word!r}: {spec!r} does not end in a valid top-level label")
    return spec


def check_macro_string(text: str, word: str, *, explanation: bool = False) -> None:
    """Every ``%`` must start a valid macro, and ``c``, ``r`` and ``t`` appear only in
    explanation texts (section 7.2); SpfSyntaxError otherwise."""
    i = 0
    while True:
        i = text.find("%", i)
        if i < 0:
            return
        match = _MACRO.match(text, i)
        if match is None:
            raise SpfSyntaxError(f"{word!r}: bad macro at {text[i:i + 8]!r}")
        letter, digits = match.group(1), match.group(2)
        allowed = "slodiphcrtv" if explanation else "slodiphv"
        if letter is not None and (letter.lower() not in allowed or digits == "0"
                                   or (digits and int(digits) > 128)):
            raise SpfSyntaxError(f"{word!r}: bad macro {match.group(0)!r}")
        i = match.end()


@dataclass(frozen=True)
class MacroContext:
    """What macros expand to (section 7.2); ``validated`` is the %{p} name, found on demand."""

    sender: str        # local@domain (postmaster@helo for the null sender)
    domain: str        # the domain being checked now (%{d})
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    helo: str
    receiver: str = "unknown"
    validated: str = "unknown"


def expand(text: str, ctx: MacroContext, *, explanation: bool = False) -> str:
    """Expand ``text``'s macros. ``c``, ``r`` and ``t`` exist only in explanations (SpfSyntaxError)."""

    def one(match: re.Match[str]) -> str:
        whole = match.group(0)
        if whole == "%%":
            return "%"
        if whole == "%_":
            return " "
        if whole == "%-":
            return "%20"
        letter, digits, reverse, delimiters = match.groups()
        lower = letter.lower()
        if lower in "crt" and not explanation:
            raise SpfSyntaxError(f"macro %{{{letter}}} is allowed only in explanations")
        value = _macro_value(lower, ctx)
        parts = re.split("[" + re.escape(delimiters or ".") + "]", value)
        if reverse:
            parts.reverse()
        if digits:
            parts = parts[-int(digits):]
        value = ".".join(parts)
        if letter.isupper():
            value = urllib.parse.quote(value, safe="-._~")
        return value

    return _MACRO.sub(one, text)


def _macro_value(letter: str, ctx: MacroContext) -> str:
    local, _, domain = ctx.sender.rpartition("@")
    if letter == "s":
        return ctx.sender
    if letter == "l":
        return local or "postmaster"
    if letter == "o":
        return domain
    if letter == "d":
        return ctx.domain
    if letter == "i":
        if ctx.ip.version == 6:  # nibbles, upper case as in section 7.4's example
            return ".".join(ctx.ip.exploded.replace(":", "").upper())
        return str(ctx.ip)
    if letter == "p":
        return ctx.validated
    if letter == "v":
        return "in-addr" if ctx.ip.version == 4 else "ip6"
    if letter == "h":
        return ctx.helo
    if letter == "c":
        return str(ctx.ip)
    if letter == "r":
        return ctx.receiver
    if letter == "t":
        return str(int(time.time()))
    raise SpfSyntaxError(f"unknown macro letter {letter!r}")


def truncate_domain(domain: str) -> str:
    """Section 4.8: an expanded domain over 253 octets loses labels on the left until it fits."""
    domain = domain.rstrip(".") if domain.endswith(".") else domain
    while len(domain) > 253 and "." in domain:
        domain = domain.split(".", 1)[1]
    return domain
