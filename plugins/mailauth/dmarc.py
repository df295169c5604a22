"""DMARC (RFC 7489): the policy of the ``From:`` domain and whether SPF or DKIM align with it.

The organizational domain comes from the Public Suffix List (``publicsuffixlist``, which ships
the list); a name the list does not know counts its last label as the suffix.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from publicsuffixlist import PublicSuffixList

from .dkim_verify import DkimResult
from .dnsquery import BadName, Dns, DnsTempError
from .spf import SpfResult

POLICIES = ("none", "quarantine", "reject")
_WEAKER = {"reject": "quarantine", "quarantine": "none", "none": "none"}
_SEVERITY = {"fail": 4, "temperror": 3, "permerror": 2, "none": 1, "pass": 0}


@dataclass(frozen=True)
class DmarcRecord:
    """A published policy, and the domain it was found at."""

    domain: str
    p: str
    sp: str
    pct: int = 100
    adkim: str = "r"
    aspf: str = "r"


@dataclass(frozen=True)
class DmarcResult:
    """``result``: pass, fail, none (no policy), temperror or permerror. ``policy`` is the one
    that applies (``p``, or ``sp`` for a subdomain; ``""`` when it could not be looked up),
    ``disposition`` what to do after ``pct``."""

    result: str
    from_domain: str = ""
    policy: str = "none"
    disposition: str = "none"
    problem: str = ""


def parse_record(text: str, domain: str) -> DmarcRecord | None:
    """A ``v=DMARC1`` record's tags; ``None`` for text that is no usable DMARC record."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        name, eq, value = part.partition("=")
        if eq:
            tags.setdefault(name.strip().lower(), value.strip())
    if text.split(";", 1)[0].replace(" ", "").lower() != "v=dmarc1":
        return None
    p = tags.get("p", "").lower()
    if p not in POLICIES:
        if not tags.get("rua"):  # section 6.6.3: without p and rua, nothing to apply
            return None
        p = "none"
    sp = tags.get("sp", "").lower()
    sp = sp if sp in POLICIES else p
    try:
        pct = min(100, max(0, int(tags.get("pct", "100"))))
    except ValueError:
        pct = 100
    adkim = "s" if tags.get("adkim", "r").lower() == "s" else "r"
    aspf = "s" if tags.get("aspf", "r").lower() == "s" else "r"
    return DmarcRecord(domain, p, sp, pct, adkim, aspf)


class Dmarc:
    """Policy discovery and evaluation, on the checks' DNS."""

    def __init__(self, dns: Dns, psl: PublicSuffixList | None = None):
        self.dns = dns
        self.psl = psl or PublicSuffixList()

    def organizational(self, domain: str) -> str:
        return self.psl.privatesuffix(domain) or domain

    async def record(self, domain: str) -> DmarcRecord | None:
        """Section 6.6.3: ``_dmarc.<From domain>``, else ``_dmarc.<organizational domain>``."""
        for name in dict.fromkeys([domain, self.organizational(domain)]):
            try:
                answer = await self.dns.txt(f"_dmarc.{name}")
            except BadName:
                return None
            found = [r.decode("ascii", "replace") for r in answer.records
                     if isinstance(r, bytes) and r[:8].lower().startswith(b"v=dmarc1")]
            records = [r for r in (parse_record(t, name) for t in found) if r is not None]
            if len(records) == 1:
                return records[0]
            if len(found) > 1:
                return None  # several records: no policy at all (section 6.6.3)
        return None

    def aligned(self, domain: str, from_domain: str, mode: str) -> bool:
        domain = domain.lower().rstrip(".")
        if mode == "s":
            return domain == from_domain
        return bool(domain) and self.organizational(domain) == self.organizational(from_domain)

    async def evaluate(self, from_domains: list[str], from_fields: int, spf: SpfResult | None,
                       dkim: list[DkimResult]) -> DmarcResult:
        """The DMARC verdict for a message; several ``From:`` domains are each checked and the
        worst outcome counts, so that adding a second address cannot dodge a policy."""
        if from_fields == 0 or not from_domains:
            return DmarcResult("permerror", problem="no From: address")
        results = [await self._one(domain, spf, dkim) for domain in from_domains]
        return max(results, key=lambda r: (_SEVERITY[r.result], POLICIES.index(r.disposition)))

    async def _one(self, from_domain: str, spf: SpfResult | None, dkim: list[DkimResult]) -> DmarcResult:
        if not from_domain or "." not in from_domain:
            return DmarcResult("permerror", from_domain, problem="From: address without a usable domain")
        try:
            record = await self.record(from_domain)
        except DnsTempError as e:
            return DmarcResult("temperror", from_domain, policy="", problem=f"policy lookup failed: {e}")
        if record is None:
            return DmarcResult("none", from_domain)
        policy = record.p if record.domain == from_domain else record.sp
        if any(d.result == "pass" and self.aligned(d.domain, from_domain, record.adkim) for d in dkim) or (
                spf is not None and spf.result == "pass" and self.aligned(spf.domain, from_domain, record.aspf)):
            return DmarcResult("pass", from_domain, policy)
        unsure = [f"spf {spf.result}"] if spf is not None and spf.result == "temperror" else []
        unsure += [f"dkim d={d.domain} {d.result}" for d in dkim if d.result == "temperror"]
        if unsure:
            return DmarcResult("temperror", from_domain, policy, problem=", ".join(unsure))
        disposition = policy if random.randrange(100) < record.pct else _WEAKER[policy]
        return DmarcResult("fail", from_domain, policy, disposition)
