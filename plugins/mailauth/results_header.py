"""The ``Authentication-Results`` header (RFC 8601): ours, and forged ones that claim to be ours."""

from __future__ import annotations

import re

from . import headers as hdr
from .dkim_verify import ArcResult, DkimResult
from .dmarc import DmarcResult
from .spf import SpfResult

NAME = "Authentication-Results"   # exactly so: dkimpy's ARC sealer looks for this spelling
_TSPECIALS = set('()<>@,;:\\"/[]?= \t')
_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_COMMENT_UNSAFE = re.compile(r"[^\x20-\x27\x2a-\x5b\x5d-\x7e]")  # no parentheses, backslash, controls
MAX_COMMENT = 80


def _value(text: str) -> str:
    """A property value: a token as it is, anything else quoted."""
    if text and not (set(text) & _TSPECIALS) and text.isascii() and text.isprintable():
        return text
    return '"' + re.sub(r'["\\\r\n]', "?", text) + '"'


def _address(sender: str, domain: str) -> str:
    """RFC 8601's ``[local-part "@"] domain-name`` form, unquoted; just the domain when the local
    part is not a dot-atom."""
    local, _, at_domain = sender.rpartition("@")
    if local and _DOT_ATOM.fullmatch(local) and sender.isascii() and _value(at_domain) == at_domain:
        return sender
    return _value(domain)


def _comment(text: str) -> str:
    text = _COMMENT_UNSAFE.sub("?", text)[:MAX_COMMENT].strip()
    return f" ({text})" if text else ""


def build(authserv_id: str, spf: SpfResult | None, dkim: list[DkimResult], dmarc: DmarcResult | None,
          arc: ArcResult | None) -> bytes:
    """The header field, folded one result per line, CRLF-terminated."""
    results = []
    if spf is not None:
        what = ("smtp.mailfrom=" + _address(spf.sender, spf.domain) if spf.identity == "mailfrom"
                else "smtp.helo=" + _value(spf.domain))
        results.append(f"spf={spf.result}{_comment(spf.problem)} {what}")
    if not dkim:
        results.append("dkim=none")
    for d in dkim:
        props = [f"header.d={_value(d.domain)}" if d.domain else "", f"header.s={_value(d.selector)}" if d.selector
                 else "", f"header.a={_value(d.algorithm)}" if d.algorithm else "",
                 f"header.b={_value(d.header_b)}" if d.header_b else ""]
        results.append(f"dkim={d.result}{_comment(d.problem)} " + " ".join(p for p in props if p))
    if dmarc is not None:
        detail = f"p={dmarc.policy} dis={dmarc.disposition}" if dmarc.result in ("pass", "fail") else dmarc.problem
        results.append(f"dmarc={dmarc.result}{_comment(detail)}"
                       + (f" header.from={_value(dmarc.from_domain)}" if dmarc.from_domain else ""))
    if arc is not None:
        detail = f"i={arc.instance}" if arc.result == "pass" else arc.problem
        results.append(f"arc={arc.result}{_comment(detail)}")
    body = ";\r\n\t".join([authserv_id] + [r.rstrip() for r in results]) if results else f"{authserv_id}; none"
    return f"{NAME}: {body}\r\n".encode("ascii", "replace")


def authserv_id_of(value: bytes) -> str:
    """The authserv-id of an ``Authentication-Results`` value (comments and a version skipped)."""
    text = value.decode("utf-8", "replace").strip()
    while text.startswith("("):  # a leading comment
        depth, i = 0, 0
        for i, ch in enumerate(text):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                break
        text = text[i + 1:].strip()
    return re.split(r"[;\s(]", text, maxsplit=1)[0].strip('"').lower()


def strip_ours(content: bytes, authserv_id: str) -> tuple[bytes, int]:
    """Remove every ``Authentication-Results`` field that claims ``authserv_id`` (section 5: only
    we may say what we checked); the content and how many were removed."""
    if not hdr.header_section_has(content, b"authentication-results"):
        return content, 0
    fields, rest = hdr.split(content)
    ours = authserv_id.lower()
    kept = [f for f in fields if not (f.name == b"authentication-results" and authserv_id_of(f.value) == ours)]
    if len(kept) == len(fields):
        return content, 0
    return hdr.join(kept, rest), len(fields) - len(kept)
