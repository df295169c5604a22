"""Looking a client address up in DNS block lists (RFC 5782), in parallel, with a TTL cache.

A list names an address by answering an A query for the reversed address under its zone
(``2.0.0.127.zen.example`` for 127.0.0.2; nibbles for IPv6) with an address in 127.0.0.0/8.
Answers outside 127/8, 127.0.0.1 and 127.255.255.0/24 are what lists send to say "you may not
ask" or "your resolver is refused" (Spamhaus, URIBL): they are logged and do not count. A list
that times out or fails (SERVFAIL) does not count either. The TXT record at the same name, the
list's explanation, is fetched only when it is needed for a rejection.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import time
from dataclasses import dataclass, replace
from typing import Any

import dns.exception
import dns.rdatatype
import dns.resolver

log = logging.getLogger("mailrelay.dnsbl")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

LISTING_RANGE = ipaddress.ip_network("127.0.0.0/8")
ERROR_CODES = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("127.255.255.0/24"))
NEGATIVE_TTL = 60.0      # "not listed" without an SOA to say for how long (RFC 2308 fallback)
MAX_TTL = 3600.0         # lists change; never trust an answer longer than this
TXT_MIN_TIME = 1.0       # the explanation may take this long even when the A answers took all the time
MAX_TEXT = 400           # an SMTP reply line is at most 512 octets (RFC 5321 4.5.3.1.5)


def client_address(peer_ip: str) -> Address | None:
    """The address to look up: scope ids dropped, IPv4-mapped IPv6 as IPv4; None if not an IP."""
    try:
        address = ipaddress.ip_address(peer_ip.split("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def query_name(address: Address, zone: str) -> str:
    """``1.0.0.127.zone.`` for 127.0.0.1; 32 reversed nibbles for IPv6 (RFC 5782 2.4)."""
    reversed_part = address.reverse_pointer.rsplit(".", 2)[0]  # drop in-addr.arpa / ip6.arpa
    return f"{reversed_part}.{zone}."


@dataclass(frozen=True)
class ListAnswer:
    """What one list said about one address."""

    zone: str
    codes: tuple[str, ...] = ()    # the listing answers (A records in 127/8)
    ignored: tuple[str, ...] = ()  # answers that signal an error, not a listing
    text: str | None = None        # the TXT explanation, once fetched
    problem: str = ""              # no usable answer (time-out, SERVFAIL): the list does not count
    skipped: bool = False          # not waited for: the verdict was clear without it

    @property
    def listed(self) -> bool:
        return bool(self.codes)


@dataclass(frozen=True)
class Outcome:
    """Every list's answer for one client, in the configured order of the lists."""

    address: Address
    answers: tuple[ListAnswer, ...]

    @property
    def hits(self) -> list[ListAnswer]:
        return [a for a in self.answers if a.listed]

    @property
    def unanswered(self) -> list[ListAnswer]:
        return [a for a in self.answers if a.problem]


class AnswerCache:
    """(address, zone) -> ListAnswer until its TTL runs out; the least recently used goes first."""

    def __init__(self, size: int):
        self.size = size
        self._entries: collections.OrderedDict[tuple[str, str], tuple[float, ListAnswer]] = \
            collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple[str, str]) -> ListAnswer | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= time.monotonic():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def put(self, key: tuple[str, str], answer: ListAnswer, ttl: float) -> None:
        if self.size <= 0 or ttl <= 0:
            return
        self._entries[key] = (time.monotonic() + min(ttl, MAX_TTL), answer)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def update(self, key: tuple[str, str], answer: ListAnswer) -> None:
        """Replace an entry's answer (the explanation fetched later), keeping its expiry."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries[key] = (entry[0], answer)


class Checker:
    """Looks addresses up in ``zones`` through ``resolver`` (a dnspython async resolver).

    Lookups are shared: a second connection from an address that is being looked up waits for
    the same queries, and a lookup whose caller stopped waiting still finishes (within
    ``timeout``) and fills the cache.
    """

    def __init__(self, resolver: Any, zones: list[str], timeout: float, cache_size: int):
        self.resolver = resolver
        self.zones = zones
        self.timeout = timeout
        self.cache = AnswerCache(cache_size)
        self._inflight: dict[tuple[str, str], asyncio.Task[ListAnswer]] = {}

    async def check(self, address: Address, *, enough: int) -> Outcome:
        """Ask every list at once; return when all have answered, ``enough`` lists name the
        address (0: wait for all), ``enough`` can no longer be reached, or time is up."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        results: dict[str, ListAnswer] = {}
        waiting: dict[asyncio.Task[ListAnswer], str] = {}
        for zone in self.zones:
            key = (str(address), zone)
            cached = self.cache.get(key)
            if cached is not None:
                results[zone] = cached
            else:
                waiting[self._lookup(key, address, zone)] = zone
        while waiting and not self._decided(results, len(waiting), enough):
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            done, _ = await asyncio.wait(waiting, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                results[waiting.pop(task)] = task.result()
        timed_out = not self._decided(results, len(waiting), enough)
        for zone in waiting.values():
            results[zone] = (ListAnswer(zone, problem=f"no answer within {self.timeout:g}s") if timed_out
                             else ListAnswer(zone, skipped=True))
        return Outcome(address, tuple(results[z] for z in self.zones if z in results))

    @staticmethod
    def _decided(results: dict[str, ListAnswer], pending: int, enough: int) -> bool:
        if enough <= 0:
            return False
        hits = sum(a.listed for a in results.values())
        return hits >= enough or hits + pending < enough

    def _lookup(self, key: tuple[str, str], address: Address, zone: str) -> asyncio.Task[ListAnswer]:
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._query(key, address, zone))
            self._inflight[key] = task
            task.add_done_callback(lambda _t: self._inflight.pop(key, None))
        return task

    async def _query(self, key: tuple[str, str], address: Address, zone: str) -> ListAnswer:
        name = query_name(address, zone)
        try:
            answer = await self.resolver.resolve(name, "A", search=False, lifetime=self.timeout,
                                                 raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN as e:
            self.cache.put(key, ListAnswer(zone), _negative_ttl(e.responses().get(e.qnames()[0])))
            return ListAnswer(zone)
        except dns.exception.Timeout:
            return ListAnswer(zone, problem=f"no answer within {self.timeout:g}s")
        except dns.resolver.NoNameservers as e:
            return ListAnswer(zone, problem=f"server failure ({_first_error(e)})")
        except dns.exception.DNSException as e:
            return ListAnswer(zone, problem=f"{type(e).__name__}: {e}")
        except Exception as e:  # a lookup that breaks must not refuse the client (fail open)
            log.exception("client=%s dnsbl=%s lookup failed", address, zone)
            return ListAnswer(zone, problem=f"{type(e).__name__}: {e}")
        codes: list[str] = []
        ignored: list[str] = []
        for rdata in answer.rrset or ():
            value = ipaddress.ip_address(rdata.address)
            listing = value in LISTING_RANGE and not any(value in net for net in ERROR_CODES)
            (codes if listing else ignored).append(str(value))
        result = ListAnswer(zone, tuple(sorted(codes)), tuple(sorted(ignored)))
        ttl = answer.rrset.ttl if answer.rrset is not None else _negative_ttl(answer.response)
        self.cache.put(key, result, ttl)
        return result

    async def explanation(self, address: Address, answer: ListAnswer) -> str:
        """The list's TXT record for ``address`` (one line, at most ``MAX_TEXT``), or ""."""
        if answer.text is not None:
            return answer.text
        try:
            txt = await self.resolver.resolve(query_name(address, answer.zone), "TXT", search=False,
                                              lifetime=max(TXT_MIN_TIME, min(self.timeout, 5.0)),
                                              raise_on_no_answer=False)
        except dns.exception.DNSException as e:
            log.info("client=%s dnsbl=%s no explanation (TXT): %s", address, answer.zone, type(e).__name__)
            return ""
        text = " ".join(b"".join(r.strings).decode("utf-8", "replace") for r in txt.rrset or ())
        # The text goes into an SMTP reply: one line of printable ASCII (RFC 5321 4.2).
        text = "".join(c if " " <= c <= "~" else "?" if c.isprintable() else " " for c in text).strip()[:MAX_TEXT]
        self.cache.update((str(address), answer.zone), replace(answer, text=text))
        return text

    async def close(self) -> None:
        """Cancel lookups still running (shutdown)."""
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _negative_ttl(response: Any) -> float:
    """RFC 2308 5: the SOA's TTL capped by its MINIMUM field; a fallback without an SOA."""
    for rrset in getattr(response, "authority", None) or ():
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
            return float(min(rrset.ttl, rrset[0].minimum))
    return NEGATIVE_TTL


def _first_error(error: dns.resolver.NoNameservers) -> str:
    errors = error.kwargs.get("errors") or []
    if errors:
        _server, _tcp, _port, problem, *_ = errors[0]
        return str(problem)
    return "no nameserver answered"
