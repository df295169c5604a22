"""Where a recipient goes: a fixed smarthost, DNS MX, or a per-domain table with wildcards.

Table keys are domains (``example.com``), wildcards (``*.example.com`` matches subdomains only)
or ``*`` (the default); values are ``host:port`` or ``mx``. The most specific key wins; without a
match the ``[forward] to`` setting applies.
"""

from __future__ import annotations

from typing import Mapping

from mailrelay_sdk import Route

MX = "mx"


class RoutingError(ValueError):
    """A bad routing table entry (reported at start-up)."""


def parse_hostport(text: str, default_port: int = 25) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]:port`` or ``v6`` to (host, port)."""
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
    if port_text and not (port_text.isascii() and port_text.isdigit() and 0 < int(port_text) < 65536):
        raise RoutingError(f"{text!r} has a bad port")
    return host, int(port_text) if port_text else default_port


def _target(value: str) -> Route:
    if value.strip().lower() == MX:
        return Route("mx")
    parse_hostport(value)  # validate now, not at the first delivery
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
