"""Where a recipient goes: a fixed smarthost, DNS MX, or a per-domain table with wildcards.

Table keys are domains (``example.com``), wildcards (``*.example.com`` matches subdomains only)
or ``*`` (the default); values are ``host:port`` (``host:port@socks-host:port`` through a SOCKS
proxy) or ``mx``. The most specific key wins; without a match the ``[forward] to`` setting applies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from mailrelay_sdk import Route

from .socks import SocksProxy, split_proxy

MX = "mx"


class RoutingError(ValueError):
    """A bad routing table entry (reported at start-up)."""


# E-MailRelay's documentation writes "example.com:smtp"; these are the names a next hop could have.
_SERVICES = {"smtp": 25, "submission": 587, "smtps": 465}


def parse_hostport(text: str, default_port: int = 25) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]:port`` or ``v6`` to (host, port); the port may be a
    number or ``smtp``, ``submission``, ``smtps``."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise RoutingError(f"{text!r} is not host:port")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    if not host:
        raise RoutingError(f"{text!r} has no host")
    if port_text.lower() in _SERVICES:
        return host, _SERVICES[port_text.lower()]
    if port_text and not (port_text.isascii() and port_text.isdigit() and 0 < int(port_text) < 65536):
        raise RoutingError(f"{text!r} has a bad port")
    return host, int(port_text) if port_text else default_port


@dataclass(frozen=True)
class NextHop:
    """A smarthost: where to connect, and the SOCKS proxy to connect through (if any)."""

    host: str
    port: int
    proxy: SocksProxy | None = None


def parse_next_hop(text: str, default_port: int = 25) -> NextHop:
    """``host:port`` or E-MailRelay's ``host:port@socks-host:socks-port`` (``socks4a://`` or
    ``socks5://``, the default, may precede the proxy's address)."""
    try:
        target, proxy_text, version = split_proxy(text.strip())
    except ValueError as e:
        raise RoutingError(str(e)) from None
    host, port = parse_hostport(target, default_port)
    if not proxy_text:
        return NextHop(host, port)
    proxy_host, proxy_port = parse_hostport(proxy_text, 1080)
    return NextHop(host, port, SocksProxy(proxy_host, proxy_port, version))


def _target(value: str) -> Route:
    if value.strip().lower() == MX:
        return Route("mx")
    parse_next_hop(value)  # validate now, not at the first delivery
    return Route("smarthost", value.strip())


class RoutingTable:
    def __init__(self, default: str, table: Mapping[str, str]):
        self.default = _target(default) if default else None
        self.exact: dict[str, Route] = {}
        self.wildcards: list[tuple[str, Route]] = []
        for key, value in table.items():
            if not isinstance(value, str):
                raise RoutingError(f"[routes] {key!r}: expected \"host:port\" or \"mx\"")
            key = key.strip().lower().rstrip(".")
            if key == "*":
                self.default = _target(value)
            elif key.startswith("*."):
                self.wildcards.append((key[1:], _target(value)))
            else:
                self.exact[key] = _target(value)
        self.wildcards.sort(key=lambda kv: -len(kv[0]))  # longest suffix first

    def route_for(self, domain: str) -> Route | None:
        domain = domain.lower().rstrip(".")
        route = self.exact.get(domain)
        if route is None:
            route = next((r for suffix, r in self.wildcards if domain.endswith(suffix)), self.default)
        if route is not None and route.kind == "mx":
            return Route("mx", domain)
        return route
