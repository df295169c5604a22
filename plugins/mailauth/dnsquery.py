"""DNS for the checks, on the relay's shared resolver, with a small TTL cache.

Every answer is one of three things: records, no records (NXDOMAIN or an empty answer, which SPF
calls a void lookup), or :class:`DnsTempError` (time-out, SERVFAIL, no nameserver answered), which
the checks turn into ``temperror``: never a crash, never a silent pass.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver
import dns.reversename

MAX_TTL = 3600.0        # never trust an answer longer than this
NEGATIVE_TTL = 60.0     # "no such record", without reading the SOA (RFC 2308 lets it be short)


class DnsTempError(Exception):
    """The DNS did not answer usefully; trying later may work."""


class BadName(ValueError):
    """A name that cannot be queried (empty or over-long label, over 255 octets)."""


@dataclass(frozen=True)
class Answer:
    """Records of one type at one name. TXT records are their strings joined (bytes); A/AAAA and
    PTR are text; MX is ``(preference, exchange)``."""

    records: tuple[Any, ...] = ()
    nxdomain: bool = False

    @property
    def void(self) -> bool:
        return not self.records


class Dns:
    """Lookups through ``resolver`` (the relay's), answers cached for their TTL (at most an hour)."""

    def __init__(self, resolver: dns.asyncresolver.Resolver, cache_size: int = 10_000):
        self.resolver = resolver
        self.cache_size = cache_size
        self._cache: collections.OrderedDict[tuple[str, str], tuple[float, Answer]] = collections.OrderedDict()
        self.queries = 0  # sent to the resolver (not answered from the cache): for tests and benchmarks

    async def query(self, name: str, rdtype: str) -> Answer:
        """Records of ``rdtype`` at ``name`` (absolute; a trailing dot is optional)."""
        try:
            qname = dns.name.from_text(name.rstrip(".") + ".")
        except (dns.exception.DNSException, UnicodeError, ValueError) as e:
            raise BadName(f"{name!r}: {e}") from None
        key = (qname.to_text().lower(), rdtype)
        cached = self._cache.get(key)
        now = time.monotonic()
        if cached is not None and cached[0] > now:
            self._cache.move_to_end(key)
            return cached[1]
        self.queries += 1
        try:
            result = await self.resolver.resolve(qname, rdtype, raise_on_no_answer=False, search=False)
        except dns.resolver.NXDOMAIN:
            answer, ttl = Answer(nxdomain=True), NEGATIVE_TTL
        except dns.resolver.YXDOMAIN:
            answer, ttl = Answer(nxdomain=True), NEGATIVE_TTL
        except (dns.resolver.NoNameservers, dns.exception.Timeout) as e:
            raise DnsTempError(f"{name} {rdtype}: {type(e).__name__}") from None
        except dns.exception.DNSException as e:
            raise DnsTempError(f"{name} {rdtype}: {type(e).__name__}: {e}") from None
        else:
            rrset = result.rrset
            if rrset is None:
                answer, ttl = Answer(), NEGATIVE_TTL
            else:
                answer, ttl = Answer(tuple(_value(r, rdtype) for r in rrset)), min(float(rrset.ttl), MAX_TTL)
        if self.cache_size and ttl > 0:
            self._cache[key] = (now + ttl, answer)
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return answer

    async def txt(self, name: str) -> Answer:
        return await self.query(name, "TXT")

    async def ptr(self, address: str) -> Answer:
        return await self.query(dns.reversename.from_address(address).to_text(), "PTR")


def _value(rdata: Any, rdtype: str) -> Any:
    if rdtype == "TXT":
        return b"".join(rdata.strings)
    if rdtype == "MX":
        return (rdata.preference, rdata.exchange.to_text(omit_final_dot=True).lower())
    if rdtype == "PTR":
        return rdata.target.to_text(omit_final_dot=True).lower()
    return rdata.to_text()
