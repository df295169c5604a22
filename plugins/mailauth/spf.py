"""SPF (RFC 7208): ``check_host()`` on the relay's async resolver.

Why not pyspf: it resolves synchronously through a module-wide resolver of its own, so it would
need a thread per check and a process-wide patch to reach ``[dns] nameservers``; this evaluator
asks the shared resolver (its cache, its timeouts), runs on the event loop and tells DNS trouble
(``temperror``) from broken records (``permerror``) exactly.

Limits (section 4.6.4): 10 DNS-querying terms per evaluation (include, a, mx, ptr, exists,
redirect), 2 void lookups, 10 MX names per mx, 10 PTR names per ptr; past them ``permerror``.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, replace
from typing import Any

from .dnsquery import Answer, BadName, Dns, DnsTempError
from .spf_record import MacroContext, Record, SpfSyntaxError, Term, check_macro_string, expand, parse, select
from .spf_record import truncate_domain

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
MAX_DNS_TERMS = 10
MAX_VOID = 2
MAX_NAMES = 10
MAX_EXPLANATION = 200
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


@dataclass(frozen=True)
class SpfResult:
    """The outcome for one identity: ``result`` is one of pass, fail, softfail, neutral, none,
    permerror, temperror; ``problem`` says why for the two errors; ``explanation`` is the
    domain's own text (``exp=``) for a fail."""

    result: str
    identity: str      # "mailfrom" or "helo"
    domain: str        # the domain checked
    sender: str        # the address checked (postmaster@helo for the null sender)
    mechanism: str = ""
    problem: str = ""
    explanation: str = ""


class _Abort(Exception):
    def __init__(self, result: str, problem: str):
        super().__init__(problem)
        self.result, self.problem = result, problem


@dataclass
class _State:
    ip: Address
    sender: str
    helo: str
    receiver: str
    dns_terms: int = 0
    voids: int = 0


def client_ip(text: str) -> Address:
    """The client address as SPF sees it: IPv4-mapped IPv6 as IPv4, scope ids dropped."""
    ip = ipaddress.ip_address(text.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def valid_domain(domain: str) -> bool:
    """Section 4.3: a multi-label name of labels of 1-63 octets; anything else gives ``none``."""
    domain = domain[:-1] if domain.endswith(".") else domain
    labels = domain.split(".")
    return len(labels) > 1 and len(domain) <= 253 and all(_LABEL.fullmatch(label) for label in labels)


class SpfChecker:
    """``check_host()`` for one message's identity; stateless between calls."""

    def __init__(self, dns: Dns, receiver: str = "unknown"):
        self.dns = dns
        self.receiver = receiver

    async def check(self, ip: str, sender: str, helo: str) -> SpfResult:
        """Check MAIL FROM ``sender``; for the null sender (``""``), the HELO name (section 2.4)."""
        identity = "mailfrom" if sender else "helo"
        if not sender or "@" not in sender:
            sender = f"postmaster@{helo}"
        local, _, domain = sender.rpartition("@")
        if not local:
            sender = f"postmaster@{domain}"
        state = _State(client_ip(ip), sender, helo, self.receiver)
        base = SpfResult("none", identity, domain.lower(), sender)
        try:
            result, mechanism, explanation = await self._check_host(state, domain, top=True)
        except _Abort as e:
            return replace(base, result=e.result, problem=e.problem)
        return replace(base, result=result, mechanism=mechanism, explanation=explanation)

    async def _check_host(self, state: _State, domain: str, top: bool = False) -> tuple[str, str, str]:
        if not valid_domain(domain):
            return "none", "", ""
        try:
            answer = await self.dns.txt(domain)
        except DnsTempError as e:
            raise _Abort("temperror", str(e)) from None
        except BadName:
            return "none", "", ""
        try:
            text = select(list(answer.records))  # type: ignore[arg-type]
            if text is None:
                return "none", "", ""
            record = parse(text)
        except SpfSyntaxError as e:
            raise _Abort("permerror", f"{domain}: {e}") from None
        ctx = MacroContext(state.sender, domain, state.ip, state.helo, state.receiver)
        for term in record.directives:
            if await self._matches(state, term, ctx):
                explanation = ""
                if term.qualifier == "fail" and top and record.explanation:
                    explanation = await self._explanation(state, record, ctx)
                return term.qualifier, _describe(term), explanation
        if record.redirect:
            target = await self._target(state, record.redirect, ctx, counts=True)
            result, mechanism, explanation = await self._check_host(state, target, top=top)
            if result == "none":
                raise _Abort("permerror", f"{domain}: redirect to {target}, which has no SPF record")
            return result, mechanism or f"redirect={target}", explanation
        return "neutral", "", ""

    # ---------------------------------------------------------------- mechanisms
    async def _matches(self, state: _State, term: Term, ctx: MacroContext) -> bool:
        name = term.name
        if name == "all":
            return True
        if name in ("ip4", "ip6"):
            network = ipaddress.ip_network(term.network, strict=False)
            return state.ip.version == network.version and state.ip in network
        target = await self._target(state, term.domain_spec or ctx.domain, ctx, counts=True)
        if name == "include":
            result, _, _ = await self._check_host(state, target)
            if result in ("temperror",):
                raise _Abort("temperror", f"include:{target}")
            if result in ("permerror", "none"):
                raise _Abort("permerror", f"include:{target} gave {result}")
            return result == "pass"
        if name == "a":
            addresses = await self._lookup(state, target, "A" if state.ip.version == 4 else "AAAA", void=True)
            return self._in_any(state, addresses, term)
        if name == "mx":
            mx = await self._lookup(state, target, "MX", void=True)
            if len(mx) > MAX_NAMES:
                raise _Abort("permerror", f"mx:{target} has more than {MAX_NAMES} MX records")
            for _, exchange in sorted(mx):
                addresses = await self._lookup(state, exchange, "A" if state.ip.version == 4 else "AAAA")
                if self._in_any(state, addresses, term):
                    return True
            return False
        if name == "exists":
            return bool(await self._lookup(state, target, "A", void=True))
        if name == "ptr":
            return await self._ptr_matches(state, target)
        raise _Abort("permerror", f"unknown mechanism {name}")  # parse() lets none through

    async def _target(self, state: _State, spec: str, ctx: MacroContext, *, counts: bool) -> str:
        if counts:
            state.dns_terms += 1
            if state.dns_terms > MAX_DNS_TERMS:
                raise _Abort("permerror", f"more than {MAX_DNS_TERMS} DNS-querying terms")
        if "%{p" in spec.lower():
            ctx = replace(ctx, validated=await self._validated_name(state, ctx.domain))
        try:
            return truncate_domain(expand(spec, ctx))
        except SpfSyntaxError as e:
            raise _Abort("permerror", str(e)) from None

    async def _lookup(self, state: _State, name: str, rdtype: str, void: bool = False) -> tuple[Any, ...]:
        try:
            answer: Answer = await self.dns.query(name, rdtype)
        except DnsTempError as e:
            raise _Abort("temperror", str(e)) from None
        except BadName:
            answer = Answer(nxdomain=True)
        if void and answer.void:
            state.voids += 1
            if state.voids > MAX_VOID:
                raise _Abort("permerror", f"more than {MAX_VOID} void DNS lookups")
        return answer.records

    @staticmethod
    def _in_any(state: _State, addresses: tuple[Any, ...], term: Term) -> bool:
        prefix = term.cidr4 if state.ip.version == 4 else term.cidr6
        for text in addresses:
            try:
                network = ipaddress.ip_network(f"{text}/{prefix}", strict=False)
            except ValueError:
                continue
            if state.ip in network:
                return True
        return False

    async def _validated_names(self, state: _State) -> list[str]:
        """Section 5.5: the client's PTR names whose own addresses include the client."""
        try:
            names = (await self.dns.ptr(str(state.ip))).records[:MAX_NAMES]
        except (DnsTempError, BadName):
            return []
        validated = []
        for name in names:
            try:
                answer = await self.dns.query(str(name), "A" if state.ip.version == 4 else "AAAA")
            except (DnsTempError, BadName):
                continue
            if any(_same_ip(a, state.ip) for a in answer.records):
                validated.append(str(name))
        return validated

    async def _ptr_matches(self, state: _State, target: str) -> bool:
        target = target.lower().rstrip(".")
        return any(n == target or n.endswith("." + target) for n in await self._validated_names(state))

    async def _validated_name(self, state: _State, domain: str) -> str:
        names = await self._validated_names(state)
        domain = domain.lower().rstrip(".")
        for pick in (lambda n: n == domain, lambda n: n.endswith("." + domain), lambda n: True):
            for name in names:
                if pick(name):
                    return name
        return "unknown"

    async def _explanation(self, state: _State, record: Record, ctx: MacroContext) -> str:
        """Section 6.2: the ``exp=`` text, or ``""`` when anything about it goes wrong."""
        try:
            target = await self._target(state, record.explanation, ctx, counts=False)
            answer = await self.dns.txt(target)
        except (_Abort, DnsTempError, BadName):
            return ""
        if len(answer.records) != 1:
            return ""
        try:
            text = answer.records[0].decode("ascii")  # type: ignore[attr-defined]
            check_macro_string(text, "exp", explanation=True)
            if "%{p" in text.lower():
                ctx = replace(ctx, validated=await self._validated_name(state, ctx.domain))
            text = expand(text, ctx, explanation=True)
        except (UnicodeDecodeError, SpfSyntaxError):
            return ""
        return "".join(c if 0x20 <= ord(c) < 0x7F else "?" for c in text)[:MAX_EXPLANATION]


def _same_ip(text: object, ip: Address) -> bool:
    try:
        return ipaddress.ip_address(str(text)) == ip
    except ValueError:
        return False


def _describe(term: Term) -> str:
    qualifier = {"pass": "", "fail": "-", "softfail": "~", "neutral": "?"}[term.qualifier]
    argument = term.network or term.domain_spec
    return f"{qualifier}{term.name}" + (f":{argument}" if argument else "")
