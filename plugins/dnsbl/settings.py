"""``[dnsbl]`` settings, and E-MailRelay's ``--dnsbl`` string.

E-MailRelay's form is ``LIST[,LIST...][,THRESHOLD[,TIMEOUT_MS[,DNS-ADDR]]]``: the leading fields
that look like domain names are the lists, then the threshold (default 1; 0 = consult and log,
never refuse), the time-out in milliseconds (default 5000; ``5s`` means seconds; a negative value
refuses connections whose verdict is still open when it expires) and the DNS server. The older,
reversed form ``DNS-ADDR,TIMEOUT_MS,THRESHOLD,LIST[,LIST...]`` is accepted too.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from mailrelay.config.loader import ConfigError
from mailrelay.dns import parse_nameserver

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# E-MailRelay never checks loopback, private (RFC 1918), link-local and unique-local clients.
DEFAULT_ALLOW = ["127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",
                 "169.254.0.0/16", "fe80::/10", "fc00::/7"]
DEFAULT_TIMEOUT_MS = 5000
_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")
_TIMEOUT = re.compile(r"([+-]?)(\d+)(s?)")


@dataclass
class DnsblSettings:
    """The ``[dnsbl]`` section. ``spec`` (what ``--dnsbl`` sets) overrides ``servers``,
    ``threshold``, ``timeout``, ``fail_closed`` and ``dns_server``."""

    spec: str = ""                 # --dnsbl: E-MailRelay's LIST,...[,THRESHOLD[,TIMEOUT_MS[,DNS-ADDR]]]
    servers: list[str] = field(default_factory=list)  # list zones, e.g. "zen.spamhaus.org"
    threshold: int = 1             # lists that must name the client; 0 = look up and log only
    timeout: float = DEFAULT_TIMEOUT_MS / 1000   # seconds for all lookups of one connection
    fail_closed: bool = False      # a time-out that leaves the verdict open refuses the client (421)
    dns_server: str = ""           # address[:port]; default: [dns] nameservers (else the system's)
    mode: Literal["reject", "tag"] = "reject"    # tag: accept, and add X-DNSBL headers instead
    allow: list[str] = field(default_factory=lambda: list(DEFAULT_ALLOW))  # never checked; [] = none
    cache_size: int = 10_000       # (client, list) answers kept for their TTL

    def __post_init__(self) -> None:
        if self.spec:
            for key, value in parse_spec(self.spec).items():
                setattr(self, key, value)
        for name in self.servers:
            if not is_list_name(name):
                raise ConfigError(f"[dnsbl] servers: {name!r} is not a DNS zone name")
        self.servers = list(dict.fromkeys(name.strip().rstrip(".").lower() for name in self.servers))
        if self.threshold < 0:
            raise ConfigError(f"[dnsbl] threshold: {self.threshold} is negative")
        if not 0 < self.timeout <= 300:
            raise ConfigError(f"[dnsbl] timeout: {self.timeout:g} is out of range (0, 300] seconds")
        if self.cache_size < 0:
            raise ConfigError(f"[dnsbl] cache_size: {self.cache_size} is negative")
        if self.dns_server:
            try:
                parse_nameserver(self.dns_server)
            except ConfigError:
                raise ConfigError(f"[dnsbl] dns_server: {self.dns_server!r} is not address[:port]") from None
        self._networks = parse_networks(self.allow)

    @property
    def networks(self) -> list[Network]:
        """``allow`` as networks."""
        return self._networks

    @property
    def nameserver(self) -> tuple[str, int] | None:
        """``dns_server`` as (address, port), or None for the relay's resolver."""
        return parse_nameserver(self.dns_server) if self.dns_server else None


def parse_networks(texts: list[str]) -> list[Network]:
    """``["10.0.0.0/8", "192.0.2.7"]`` to networks (a bare address is a single host)."""
    networks: list[Network] = []
    for text in texts:
        try:
            networks.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError:
            raise ConfigError(f"[dnsbl] allow: {text!r} is not an address or network (CIDR)") from None
    return networks


def is_list_name(text: str) -> bool:
    """A DNS zone name such as ``zen.spamhaus.org`` (not a number, a time-out or an address)."""
    labels = text.strip().rstrip(".").split(".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        return False
    return not labels[-1].isdigit() and not _TIMEOUT.fullmatch(text.strip())


def parse_spec(text: str) -> dict[str, Any]:
    """E-MailRelay's ``--dnsbl`` string to ``[dnsbl]`` keys; raises ConfigError."""
    fields = [f.strip() for f in text.split(",")]
    bad = f"--dnsbl {text!r}: "
    if not fields[0] or not is_list_name(fields[0]):
        # The older, reversed order: DNS-ADDR,TIMEOUT,THRESHOLD,LIST...
        if len(fields) < 4:
            raise ConfigError(bad + "expected LIST[,LIST...][,THRESHOLD[,TIMEOUT_MS[,DNS-ADDR]]]")
        dns, timeout, threshold, servers = fields[0], fields[1], fields[2], fields[3:]
        if not all(is_list_name(s) for s in servers):
            raise ConfigError(bad + "expected DNS-ADDR,TIMEOUT_MS,THRESHOLD,LIST[,LIST...]")
    else:
        count = 0
        while count < len(fields) and is_list_name(fields[count]):
            count += 1
        servers, rest = fields[:count], fields[count:]
        if len(rest) > 3:
            raise ConfigError(bad + f"unused fields after the DNS server: {','.join(rest[3:])!r}")
        threshold = rest[0] if rest else "1"
        timeout = rest[1] if len(rest) > 1 else str(DEFAULT_TIMEOUT_MS)
        dns = rest[2] if len(rest) > 2 else ""
    if not threshold.isdigit():
        raise ConfigError(bad + f"threshold {threshold!r} is not a whole number")
    match = _TIMEOUT.fullmatch(timeout)
    if match is None:
        raise ConfigError(bad + f"time-out {timeout!r} is not milliseconds (or seconds with 's')")
    sign, number, seconds = match.groups()
    millis = int(number) * (1000 if seconds else 1)
    if millis == 0:
        raise ConfigError(bad + "the time-out must be more than 0")
    if dns:
        try:
            parse_nameserver(dns)
        except ConfigError:
            raise ConfigError(bad + f"DNS server {dns!r} is not address[:port]") from None
    return {"servers": servers, "threshold": int(threshold), "timeout": millis / 1000,
            # E-MailRelay: a negative time-out refuses on time-out, except when only logging.
            "fail_closed": sign == "-" and int(threshold) > 0, "dns_server": dns}
