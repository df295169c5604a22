"""MTA-STS (RFC 8461): which MX hosts of a recipient domain may be used, and that they need verified TLS.

A domain announces a policy with a ``_mta-sts.<domain>`` TXT record (``v=STSv1; id=...``) and
serves it at ``https://mta-sts.<domain>/.well-known/mta-sts.txt``. :class:`MtaSts` looks the
record up through the relay's resolver, fetches the policy when its id is new, and keeps it for
its ``max_age`` in memory and on disk (one JSON file per domain, named by a hash of the domain,
under the spool directory), so a restart does not lose what RFC 8461 says must be remembered:

- the TXT id equals the cached policy's id: the cached policy, no fetch;
- the id differs, or nothing is cached: fetch; if that fails, the cached policy while it has not
  expired (section 5.1), otherwise no policy;
- no TXT record, or its lookup failed: the cached policy while it has not expired (removing the
  record does not withdraw a policy; publishing ``mode: none`` does).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import dns.asyncresolver
import dns.exception
import dns.name
import dns.resolver

from .mx import _lookup_addresses, ascii_domain

log = logging.getLogger("mailrelay.forward.mta_sts")

MAX_POLICY_SIZE = 64 * 1024   # RFC 8461 section 3.3 suggests this limit
MAX_AGE_LIMIT = 31557600      # one year, the largest max_age section 3.2 allows
_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_KEY = re.compile(r"[A-Za-z0-9_.-]+")

Mode = Literal["enforce", "testing", "none"]


class PolicyError(ValueError):
    """A policy or TXT record that does not follow RFC 8461."""


class FetchError(Exception):
    """The policy could not be fetched (DNS, connection, TLS, HTTP status, media type, size)."""


@dataclass(frozen=True)
class Policy:
    """One domain's policy as fetched: ``id`` is the TXT record's id at fetch time."""

    domain: str
    mode: Mode
    mx: tuple[str, ...]
    max_age: int
    id: str
    fetched: float
    text: str

    @property
    def expires(self) -> float:
        return self.fetched + self.max_age

    def allows(self, host: str) -> bool:
        """Whether MX host ``host`` matches one of the policy's ``mx`` patterns."""
        return any(mx_matches(pattern, host) for pattern in self.mx)


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 section 4.1: an exact (case-insensitive) match, or ``*.example.com`` matching
    exactly one more label on the left (``mx1.example.com``, not ``example.com`` or ``a.b.example.com``)."""
    pattern, host = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if pattern.startswith("*."):
        label, dot, rest = host.partition(".")
        return bool(label) and bool(dot) and rest == pattern[2:] and "*" not in label
    return pattern == host


def parse_txt(strings: list[bytes]) -> str:
    """The ``id`` of a ``v=STSv1`` TXT record (its character-strings joined); PolicyError if malformed."""
    try:
        text = b"".join(strings).decode("ascii")
    except UnicodeDecodeError:
        raise PolicyError("TXT record is not ASCII") from None
    fields = [f.strip() for f in text.split(";") if f.strip()]
    if not fields or fields[0] != "v=STSv1":
        raise PolicyError(f"TXT record does not start with v=STSv1: {text!r}")
    values = dict(f.partition("=")[::2] for f in fields[1:])
    record_id = values.get("id", "")
    if not _ID.fullmatch(record_id):
        raise PolicyError(f"TXT record has no valid id (1 to 32 letters and digits): {text!r}")
    return record_id


def parse_policy(domain: str, text: str, record_id: str, fetched: float) -> Policy:
    """A policy file (RFC 8461 section 3.2) as a :class:`Policy`; PolicyError if it is not valid."""
    values: dict[str, str] = {}
    mx: list[str] = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            continue
        key, colon, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if not colon or not _KEY.fullmatch(key):
            raise PolicyError(f"policy line is not 'key: value': {line!r}")
        if key == "mx":
            mx.append(value)
        else:
            values.setdefault(key, value)  # a repeated key: the first one counts
    if values.get("version") != "STSv1":
        raise PolicyError("policy has no 'version: STSv1'")
    mode = values.get("mode")
    if mode not in ("enforce", "testing", "none"):
        raise PolicyError(f"policy mode {mode!r} is not enforce, testing or none")
    age = values.get("max_age", "")
    if not (age.isascii() and age.isdigit() and len(age) <= 10 and int(age) <= MAX_AGE_LIMIT):
        raise PolicyError(f"policy max_age {age!r} is not a number of seconds up to {MAX_AGE_LIMIT}")
    if mode != "none" and not mx:
        raise PolicyError(f"policy in mode {mode} lists no mx")
    return Policy(domain, mode, tuple(mx), int(age), record_id, fetched, text)  # type: ignore[arg-type]


class MtaSts:
    """Policy discovery, fetching and caching for the forwarding client."""

    def __init__(self, resolver: dns.asyncresolver.Resolver, cache_dir: Path, *, ca_file: str = "",
                 https_port: int = 443, timeout: float = 30.0):
        self.resolver = resolver
        self.cache_dir = cache_dir
        self.https_port = https_port
        self.timeout = timeout
        self.tls = ssl.create_default_context()
        if ca_file:
            self.tls.load_verify_locations(cafile=ca_file)
        self._policies: dict[str, Policy | None] = {}  # loaded from disk (None: nothing there)
        self._locks: dict[str, asyncio.Lock] = {}

    async def policy_for(self, domain: str) -> Policy | None:
        """The policy in force for ``domain`` (a recipient domain), or None."""
        name = ascii_domain(domain)
        async with self._locks.setdefault(name, asyncio.Lock()):
            return await self._policy_for(name)

    async def _policy_for(self, domain: str) -> Policy | None:
        now = time.time()
        cached = await self._cached(domain)
        if cached is not None and cached.expires <= now:
            cached = None
        try:
            record_id = await self._record_id(domain)
        except FetchError as e:
            log.info("mta-sts domain=%s: %s%s", domain, e, "; using the cached policy" if cached else "")
            return cached
        if record_id is None or (cached is not None and cached.id == record_id):
            return cached
        try:
            text = await asyncio.wait_for(self._fetch(domain), self.timeout)
            policy = parse_policy(domain, text, record_id, now)
        except (FetchError, PolicyError, asyncio.TimeoutError) as e:
            reason = str(e) or f"no answer within {self.timeout:g} s"
            log.warning("mta-sts domain=%s: policy fetch failed: %s%s", domain, reason,
                        "; using the cached policy" if cached else "; delivering as if there were no policy")
            return cached
        log.info("mta-sts domain=%s: policy id=%s mode=%s mx=%s max_age=%d", domain, policy.id, policy.mode,
                 ",".join(policy.mx), policy.max_age)
        await self._store(policy)
        return policy

    async def _record_id(self, domain: str) -> str | None:
        """The id of ``_mta-sts.<domain>``; None when there is no (single, valid) record."""
        try:
            answer = await self.resolver.resolve(dns.name.from_text(f"_mta-sts.{domain}"), "TXT")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        except dns.exception.DNSException as e:
            raise FetchError(f"TXT lookup of _mta-sts.{domain} failed: {e}") from None
        records = [r.strings for r in answer if b"".join(r.strings).startswith(b"v=STSv1")]
        if len(records) != 1:  # section 3.1: several records mean none
            return None
        try:
            return parse_txt(list(records[0]))
        except PolicyError as e:
            log.info("mta-sts domain=%s: %s", domain, e)
            return None

    async def _fetch(self, domain: str) -> str:
        host = f"mta-sts.{domain}"
        [(addresses, failure, _, _)] = await _lookup_addresses(self.resolver, [dns.name.from_text(host)])
        if not addresses:
            raise FetchError(failure.message if failure else f"{host} has no address")
        error = FetchError(f"{host}: no address answered")
        for address in addresses:
            try:
                return await self._get(host, address)
            except (OSError, FetchError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
                error = e if isinstance(e, FetchError) else FetchError(f"https://{host}:{self.https_port}: {e}")
        raise error

    async def _get(self, host: str, address: str) -> str:
        """GET the policy over HTTPS from ``address``, the certificate verified for ``host``.

        HTTP/1.0 keeps this a few lines (no chunked bodies, the server closes); an HTTP library
        would also want to resolve ``host`` itself, and only the relay's resolver knows our DNS.
        """
        reader, writer = await asyncio.open_connection(address, self.https_port, ssl=self.tls,
                                                       server_hostname=host)
        try:
            authority = host if self.https_port == 443 else f"{host}:{self.https_port}"
            writer.write(f"GET /.well-known/mta-sts.txt HTTP/1.0\r\nHost: {authority}\r\n"
                         "Accept: text/plain\r\nUser-Agent: mailrelay\r\nConnection: close\r\n\r\n".encode())
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            status_line, *header_lines = head.split("\r\n")
            parts = status_line.split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/"):
                raise FetchError(f"https://{authority}: not an HTTP response")
            if parts[1] != "200":  # redirects are not followed (section 3.3)
                raise FetchError(f"https://{authority}/.well-known/mta-sts.txt: HTTP {' '.join(parts[1:])}")
            headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines if h)}
            media_type = headers.get("content-type", "").split(";")[0].strip().lower()
            if media_type != "text/plain":
                raise FetchError(f"https://{authority}: policy media type is {media_type or 'missing'}, "
                                 "not text/plain")
            if "transfer-encoding" in headers:
                raise FetchError(f"https://{authority}: unexpected Transfer-Encoding in an HTTP/1.0 reply")
            length = headers.get("content-length", "")
            if length.isdigit():
                if int(length) > MAX_POLICY_SIZE:
                    raise FetchError(f"https://{authority}: policy larger than {MAX_POLICY_SIZE} octets")
                body = await reader.readexactly(int(length))
            else:
                body = await reader.read(MAX_POLICY_SIZE + 1)
                while body and len(body) <= MAX_POLICY_SIZE and (more := await reader.read(MAX_POLICY_SIZE)):
                    body += more
                if len(body) > MAX_POLICY_SIZE:
                    raise FetchError(f"https://{authority}: policy larger than {MAX_POLICY_SIZE} octets")
        finally:
            writer.close()
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError:
            raise FetchError(f"https://{authority}: policy is not UTF-8 text") from None

    # ------------------------------------------------------------ the cache
    def _path(self, domain: str) -> Path:
        # Named by a hash: the domain comes from a recipient address, never from a path.
        return self.cache_dir / (hashlib.sha256(domain.encode()).hexdigest()[:40] + ".json")

    async def _cached(self, domain: str) -> Policy | None:
        if domain not in self._policies:
            self._policies[domain] = await asyncio.to_thread(self._load, domain)
        return self._policies[domain]

    def _load(self, domain: str) -> Policy | None:
        try:
            data = json.loads(self._path(domain).read_text())
            if data.get("domain") != domain:
                return None
            return parse_policy(domain, data["policy"], data["id"], float(data["fetched"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("mta-sts domain=%s: ignoring unreadable cache file %s: %s", domain, self._path(domain), e)
            return None

    async def _store(self, policy: Policy) -> None:
        self._policies[policy.domain] = policy
        try:
            await asyncio.to_thread(self._save, policy)
        except OSError as e:  # the in-memory copy still works; only a restart forgets it
            log.warning("mta-sts domain=%s: cannot write the policy cache: %s", policy.domain, e)

    def _save(self, policy: Policy) -> None:
        self.cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self._path(policy.domain)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"domain": policy.domain, "id": policy.id, "fetched": policy.fetched,
                                   "policy": policy.text}))
        os.replace(tmp, path)
