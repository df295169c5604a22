"""Which MX hosts may be used, and with what TLS: DANE first, then MTA-STS, else the default.

RFC 8461 section 2: where a host has DNSSEC-validated TLSA records, DANE decides and the MTA-STS
policy is not consulted for that host; the policy is fetched only when some host has no DANE.

- DANE (``[dane] enabled``): for a host whose MX and address answers were authentic, a secure
  TLSA RRset makes TLS mandatory and the certificate must match it; a failed TLSA lookup makes
  the host unusable (RFC 7672 section 2.2), the next one is tried.
- MTA-STS (``[mta_sts] enabled``): with ``mode: enforce`` only hosts matching the policy's ``mx``
  patterns are used, over TLS with a certificate that verifies for the host name; ``testing``
  logs what would have failed and delivers anyway; ``none`` (or no policy) changes nothing.

Both apply to MX routing only: a smarthost is the operator's own choice, secured by the
``[forward] tls`` and ``tls_verify`` settings.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import dns.asyncresolver

from .hop import Hop, TlsRequirement
from .dane import TlsaAnswer, lookup_tlsa
from .mta_sts import MtaSts, Policy
from .mx import MailHost, ascii_domain

log = logging.getLogger("mailrelay.forward")


@dataclass(frozen=True)
class Plan:
    """The hops to try, best first, and why other hosts were left out (for the log and, when no
    hop is left, the deferral reason that ``relay queue show`` prints)."""

    hops: list[Hop]
    excluded: list[str]


class TransportSecurity:
    """Turns a domain's MX hosts into hops with their TLS requirements."""

    def __init__(self, *, mta_sts: MtaSts | None, dane_resolver: dns.asyncresolver.Resolver | None):
        self.mta_sts = mta_sts
        self.dane_resolver = dane_resolver

    async def plan(self, message_id: str, domain: str, hosts: list[MailHost], port: int) -> Plan:
        """Hops for ``hosts`` (of recipient ``domain``) on ``port``; address literals get no checks."""
        if domain.startswith("["):
            return Plan([Hop(a, port) for host in hosts for a in host.addresses], [])
        domain = ascii_domain(domain)
        tlsa = await self._tlsa(hosts, port)
        policy: Policy | None = None
        if self.mta_sts is not None and any(answer is None or not answer.records for answer in tlsa):
            policy = await self.mta_sts.policy_for(domain)
            if policy is not None and policy.mode == "none":
                policy = None
        hops: list[Hop] = []
        excluded: list[str] = []
        for host, answer in zip(hosts, tlsa):
            need = self._requirement(message_id, domain, host, answer, policy, excluded)
            if need is not None:
                hops += [Hop(address, port, host.name, tls=need) for address in host.addresses]
        for reason in excluded:
            log.info("id=%s not using %s", message_id, reason)
        return Plan(hops, excluded)

    async def _tlsa(self, hosts: list[MailHost], port: int) -> list[TlsaAnswer | None]:
        """Each host's TLSA answer; None where DANE does not apply (disabled, or an insecure host)."""
        resolver = self.dane_resolver
        if resolver is None:
            return [None] * len(hosts)
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(_host_tlsa(resolver, host, port)) if host.secure else None
                     for host in hosts]
        return [task.result() if task is not None else None for task in tasks]

    @staticmethod
    def _requirement(message_id: str, domain: str, host: MailHost, answer: TlsaAnswer | None,
                     policy: Policy | None, excluded: list[str]) -> TlsRequirement | None:
        if answer is not None and answer.error:
            excluded.append(f"{host.name}: {answer.error} (DANE: the host's own DNS is signed, so this is "
                            "not an absence of records)")
            return None
        if answer is not None and answer.records:
            usable = tuple(r for r in answer.records if r.usable)
            source = f"DANE TLSA records of {answer.name}"
            if not usable:  # RFC 7672 section 2.2: still encrypted, nothing to authenticate with
                return TlsRequirement("encrypt", host.name, source=source + " (none usable)")
            # The TLSA base domain is the name the server should answer for (and the SNI); the
            # MX host name and the recipient domain are accepted too (RFC 7672 section 3.2.2).
            base = answer.base or host.name
            others = tuple(dict.fromkeys(n for n in (host.name, domain) if n != base))
            return TlsRequirement("dane", base, others, usable, source)
        if policy is None:
            return TlsRequirement(name=host.name)
        source = f"MTA-STS policy of {domain} (mode {policy.mode}, id {policy.id})"
        if not policy.allows(host.name):
            if policy.mode == "testing":
                log.warning("id=%s %s does not list MX host %s (mx: %s); testing mode, so using it anyway",
                            message_id, source, host.name, ", ".join(policy.mx))
                return TlsRequirement(name=host.name)
            excluded.append(f"MX host {host.name}: not in the {source}, which allows only mx {', '.join(policy.mx)}")
            return None
        return TlsRequirement("verify", host.name, source=source, testing=policy.mode == "testing")


async def _host_tlsa(resolver: dns.asyncresolver.Resolver, host: MailHost, port: int) -> TlsaAnswer:
    """RFC 7672 section 2.2.2: for an alias (secure CNAME chain), the expanded name's TLSA
    records if it has secure ones, else the MX host name's."""
    if host.expanded:
        answer = await lookup_tlsa(resolver, host.expanded, port)
        if answer.records or answer.error:
            return answer
    return await lookup_tlsa(resolver, host.name, port)
