"""The one async DNS resolver every plugin shares (MX routing, DNSBL, SPF, MTA-STS)."""

from __future__ import annotations

import ipaddress

import dns.asyncresolver
import dns.nameserver

from .config.loader import ConfigError
from .config.settings import DnsSettings


def parse_nameserver(text: str) -> tuple[str, int]:
    """``"127.0.0.1"``, ``"127.0.0.1:5353"``, ``"::1"`` or ``"[::1]:5353"`` to (address, port)."""
    text = text.strip()
    host, port = text, 53
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ConfigError(f"[dns] nameservers: {text!r} is not address[:port]")
        if rest:
            port = _port(rest[1:], text)
    elif text.count(":") == 1:
        host, _, p = text.partition(":")
        port = _port(p, text)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"[dns] nameservers: {text!r}: {host!r} is not an IP address") from None
    return host, port


def _port(text: str, whole: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) < 65536:
        raise ConfigError(f"[dns] nameservers: {whole!r} has a bad port")
    return int(text)


def make_resolver(settings: DnsSettings) -> dns.asyncresolver.Resolver:
    """A resolver from ``[dns]``: the system's configuration unless nameservers are given."""
    if settings.nameservers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port)
                                for host, port in map(parse_nameserver, settings.nameservers)]
    else:
        try:
            resolver = dns.asyncresolver.Resolver()
        except dns.resolver.NoResolverConfiguration:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = ["127.0.0.1"]
    resolver.timeout = settings.timeout
    resolver.lifetime = settings.timeout * settings.attempts
    return resolver
