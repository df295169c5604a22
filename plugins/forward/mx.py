"""MX routing, the DNS side: a recipient domain to the mail hosts to try, in order.

Follows RFC 5321 section 5.1 (MX, implicit MX, address literals) and RFC 7505 (null MX). Every
lookup goes through the relay's shared resolver (``relay.resolver``) and its timeouts; every DNS
failure becomes an :class:`MxError` that says whether retrying can help, never a crash and never
an empty list.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import re
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.resolver


@dataclass(frozen=True)
class MailHost:
    """One host to deliver to: an MX target (or the implicit MX) with its addresses."""

    preference: int
    name: str                   # host name in ASCII, without trailing dot; never ""
    addresses: tuple[str, ...]  # IPv4 and IPv6 addresses, in the order to try; never empty
    # DNSSEC: the resolver set the AD bit on the MX answer (or the implicit MX's denial) and on
    # this host's address answers. Only a resolver asked for AD (see dane.py) ever says so.
    secure: bool = False
    # When ``name`` is a CNAME alias and the answers are secure: the fully expanded name, which
    # DANE tries first as the TLSA base domain (RFC 7672 section 2.2.2); "" otherwise.
    expanded: str = ""


class MxError(Exception):
    """Routing to a domain failed.

    ``permanent`` says whether the message should bounce (True) or be retried later (False);
    ``status`` is the RFC 3463 enhanced status code for the DSN or log; ``message`` reads well in
    either.
    """

    permanent: bool = False
    status: str = "4.4.0"

    def __init__(self, message: str, *, permanent: bool | None = None, status: str | None = None):
        super().__init__(message)
        self.message = message
        if permanent is not None:
            self.permanent = permanent
        if status is not None:
            self.status = status


class NullMx(MxError):
    """The domain publishes a null MX (RFC 7505): it accepts no mail at all."""

    permanent = True
    status = "5.1.10"


class NoSuchDomain(MxError):
    """The domain does not exist (NXDOMAIN)."""

    permanent = True
    status = "5.1.2"


class DnsTemporaryError(MxError):
    """No usable DNS answer: SERVFAIL, timeout, or no nameserver answered."""

    permanent = False
    status = "4.4.3"


class NoMailHosts(MxError):
    """The domain exists but no host to deliver to has an address.

    Without MX records and without addresses of its own (or with ``implicit_mx=False``) that is
    permanent, 5.1.2. With MX records whose hosts have no A or AAAA records it is temporary, 4.4.4;
    see :func:`resolve_mail_hosts` for why.
    """


_LDH_DOMAIN = re.compile(r"(?:[A-Za-z0-9_-]{1,63}\.)*[A-Za-z0-9_-]{1,63}")


async def resolve_mail_hosts(resolver: dns.asyncresolver.Resolver, domain: str, *,
                             implicit_mx: bool = True) -> list[MailHost]:
    """The hosts to try for ``domain``, best first; raises :class:`MxError` when there are none.

    - ``domain`` is the part after "@": a name (a trailing dot is allowed; non-ASCII names are
      converted with IDNA 2008 and the UTS #46 mapping, as browsers and modern MTAs do, so
      "straße.de" is ``xn--strae-oqa.de``, not IDNA 2003's "strasse.de") or an address literal,
      ``[192.0.2.1]`` or ``[IPv6:2001:db8::1]``, which is returned as its own host with no DNS
      lookup. A malformed domain or literal is a permanent 5.1.3.
    - MX records are sorted by preference, lowest first; hosts of equal preference are shuffled
      on every call, which spreads load as RFC 5321 asks. A host listed twice keeps its best
      preference.
    - A and AAAA of all hosts are looked up concurrently. Addresses alternate between the
      families, IPv6 first (RFC 8305's order); within a family they keep the DNS order. A host
      with no address records is skipped. A host whose lookup failed temporarily is skipped too
      when other hosts have addresses (delivering to a backup MX is what backups are for);
      otherwise the result is :class:`DnsTemporaryError`.
    - If every MX host lacks addresses the error is :class:`NoMailHosts`, temporary 4.4.4: such
      an MX set is usually a zone being edited or a broken secondary, and retrying until the
      queue's lifetime runs out gives the owner time to fix it. This is older Postfix's
      behaviour and today's ``smtp_defer_if_no_mx_address_found = yes``; current Postfix and
      Exim bounce at once instead ("all relevant MX records point to non-existent hosts").
    - No MX records: the implicit MX (RFC 5321 section 5.1), the domain itself with preference 0.
      If it has no A or AAAA either, or ``implicit_mx`` is False, that is :class:`NoMailHosts`,
      permanent 5.1.2.
    - A null MX (RFC 7505: the only MX is ".") raises :class:`NullMx`, 5.1.10. A "." among
      other MX records, which RFC 7505 forbids, is ignored.
    - NXDOMAIN raises :class:`NoSuchDomain`, 5.1.2. SERVFAIL, timeouts and unreachable
      nameservers raise :class:`DnsTemporaryError`, 4.4.3.

    Each lookup is bounded by the resolver's ``lifetime``; the address lookups run in parallel,
    so the whole call takes at most about two lifetimes. ``secure`` on each host tells whether
    its MX and address answers carried the AD bit (RFC 7672 section 2.2: DANE applies only then).
    """
    literal = _address_literal(domain)
    if literal is not None:
        return [MailHost(0, literal, (literal,))]
    name = _domain_name(domain)
    shown = name.to_text(omit_final_dot=True)
    try:
        answer = await resolver.resolve(name, "MX")
    except dns.resolver.NXDOMAIN:
        raise NoSuchDomain(f"{shown}: no such domain (NXDOMAIN)") from None
    except dns.resolver.NoAnswer as e:
        if not implicit_mx:
            raise NoMailHosts(f"{shown}: no MX records", permanent=True, status="5.1.2") from None
        return await _implicit_mx(resolver, name, _authentic(e.response()))
    except dns.exception.DNSException as e:
        raise DnsTemporaryError(f"{shown}: MX lookup failed: {e}") from e

    preferences: dict[dns.name.Name, int] = {}
    for record in answer:
        if record.exchange != dns.name.root:
            exchange = record.exchange.canonicalize()
            preferences[exchange] = min(record.preference, preferences.get(exchange, record.preference))
    if not preferences:
        raise NullMx(f"{shown} accepts no mail (null MX, RFC 7505)")
    order = sorted(preferences, key=lambda exchange: (preferences[exchange], random.random()))
    looked_up = await _lookup_addresses(resolver, order)
    mx_secure = _authentic(answer.response)

    hosts = [MailHost(preferences[exchange], exchange.to_text(omit_final_dot=True), addresses,
                      mx_secure and secure, expanded if mx_secure and secure else "")
             for exchange, (addresses, _, secure, expanded) in zip(order, looked_up) if addresses]
    if hosts:
        return hosts
    failures = [failure for _, failure, _, _ in looked_up if failure is not None]
    if failures:
        raise DnsTemporaryError(f"{shown}: no MX host could be resolved: {failures[0].message}")
    names = ", ".join(exchange.to_text(omit_final_dot=True) for exchange in order)
    raise NoMailHosts(f"{shown}: no MX host has an address ({names})", permanent=False, status="4.4.4")


async def _implicit_mx(resolver: dns.asyncresolver.Resolver, name: dns.name.Name,
                       denial_secure: bool) -> list[MailHost]:
    shown = name.to_text(omit_final_dot=True)
    [(addresses, failure, secure, expanded)] = await _lookup_addresses(resolver, [name])
    if addresses:
        return [MailHost(0, shown, addresses, denial_secure and secure, expanded if denial_secure and secure else "")]
    if failure is not None:
        raise DnsTemporaryError(f"{shown}: no MX records, and {failure.message}")
    raise NoMailHosts(f"{shown}: neither MX nor address records", permanent=True, status="5.1.2")


def _authentic(response: dns.message.Message | None) -> bool:
    return response is not None and bool(response.flags & dns.flags.AD)


async def _lookup_addresses(resolver: dns.asyncresolver.Resolver, names: list[dns.name.Name]
                            ) -> list[tuple[tuple[str, ...], DnsTemporaryError | None, bool, str]]:
    """For each name: its addresses (maybe none), a temporary failure if a lookup had one,
    whether every address answer that has addresses was authentic (AD bit), and the name the
    answers' CNAME chain ends at when it is not the name itself (else "")."""
    async with asyncio.TaskGroup() as group:
        tasks = [(group.create_task(_lookup(resolver, name, "AAAA")),
                  group.create_task(_lookup(resolver, name, "A"))) for name in names]
    results = []
    for name, (ipv6_task, ipv4_task) in zip(names, tasks):
        answers = ipv6_task.result(), ipv4_task.result()
        failure = next((r for r in answers if isinstance(r, DnsTemporaryError)), None)
        found = [r for r in answers if not isinstance(r, DnsTemporaryError) and r[0]]
        ipv6, ipv4 = ([] if isinstance(r, DnsTemporaryError) else r[0] for r in answers)
        # A failed lookup does not make the host insecure: blocking AAAA must not switch DANE off.
        secure = all(r[1] for r in found)
        expanded = next((r[2] for r in found if r[2] != name), None)
        alternating = [a for pair in zip(ipv6, ipv4) for a in pair]
        longer = ipv6 if len(ipv6) > len(ipv4) else ipv4
        results.append((tuple(alternating + longer[len(alternating) // 2:]), failure, secure,
                        expanded.to_text(omit_final_dot=True).lower() if expanded is not None else ""))
    return results


async def _lookup(resolver: dns.asyncresolver.Resolver, name: dns.name.Name, rdtype: str
                  ) -> tuple[list[str], bool, dns.name.Name] | DnsTemporaryError:
    """Addresses of one type, whether the answer was authentic, and the owner name of the
    addresses (``name`` itself unless it is an alias): none for NXDOMAIN or no records; a
    temporary failure as a value."""
    try:
        answer = await resolver.resolve(name, rdtype)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return [], False, name
    except dns.exception.DNSException as e:
        return DnsTemporaryError(f"{rdtype} lookup of {name.to_text(omit_final_dot=True)} failed: {e}")
    return [record.address for record in answer], _authentic(answer.response), answer.canonical_name


def _address_literal(domain: str) -> str | None:
    """The address in ``[192.0.2.1]`` or ``[IPv6:2001:db8::1]`` (RFC 5321 4.1.3); None for a name."""
    if not domain.startswith("["):
        return None
    inner = domain[1:-1] if domain.endswith("]") else None
    try:
        if inner is not None and inner[:5].lower() == "ipv6:":
            address = ipaddress.IPv6Address(inner[5:])
            if address.scope_id is None:  # a zone ("%eth0") means nothing to another host
                return str(address)
        elif inner is not None:
            return str(ipaddress.IPv4Address(inner))
    except ValueError:
        pass
    raise MxError(f"{domain!r} is not a valid address literal", permanent=True, status="5.1.3")


def ascii_domain(domain: str) -> str:
    """``domain`` in ASCII (IDNA 2008 A-labels), lower case, without a trailing dot; MxError if malformed."""
    return _domain_name(domain).to_text(omit_final_dot=True).lower()


def _domain_name(domain: str) -> dns.name.Name:
    """The absolute DNS name for ``domain`` (so no search list applies), IDNA-encoded if needed."""
    text = domain.removesuffix(".")
    try:
        if text.isascii():
            if _LDH_DOMAIN.fullmatch(text):
                return dns.name.from_text(text)
        elif text:
            return dns.name.from_unicode(text, idna_codec=dns.name.IDNA_2008_Practical)
    except dns.name.NoIDNA2008:
        raise MxError(f"{domain}: converting a non-ASCII domain needs the idna package",
                      permanent=False, status="4.3.5") from None
    except dns.exception.DNSException as e:
        raise MxError(f"{domain!r} is not a valid domain: {e}", permanent=True, status="5.1.3") from None
    raise MxError(f"{domain!r} is not a valid domain", permanent=True, status="5.1.3")
