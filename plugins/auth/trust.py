"""Trusted client addresses: ``server none ADDRESS KEYWORD`` lines of the secrets file.

E-MailRelay lets clients from these addresses send mail without AUTH, and passes the keyword to
address verifiers. ADDRESS is one of:

* an address: ``192.168.0.1``, ``fe80::1``;
* an IPv4 wildcard with trailing ``*`` parts: ``192.168.0.*``, ``10.*.*.*``, ``*.*.*.*``;
* a network in CIDR notation: ``192.168.0.0/24``, ``fc00::/7``. Host bits must be zero:
  E-MailRelay would never match ``192.168.0.1/24``, and reading it as the /24 would trust more
  than the file says, so it is refused.

When several entries match, the most specific one (the longest prefix) gives the keyword.
IPv4 clients seen through an IPv6 socket (``::ffff:192.0.2.1``) match IPv4 entries.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from mailrelay.net import client_address

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
parse_client_address = client_address  # zone removed, IPv4-mapped unwrapped; None without an IP


def parse_address_range(text: str) -> IPNetwork:
    """One ADDRESS field of a ``server none`` line as a network; ValueError with a readable reason."""
    if "*" in text:
        parts = text.split(".")
        first_star = parts.index("*") if "*" in parts else -1
        if len(parts) != 4 or first_star < 0 or any(part != "*" for part in parts[first_star:]):
            raise ValueError(f"{text!r}: only trailing parts of an IPv4 address may be '*' (192.168.0.*)")
        fixed = parts[:first_star]
        text = ".".join(fixed + ["0"] * (4 - len(fixed))) + f"/{8 * len(fixed)}"
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as e:
        if "has host bits set" in str(e):
            network = ipaddress.ip_network(text, strict=False)
            raise ValueError(f"{text!r} has host bits set (did you mean {network}?)") from None
        raise ValueError(f"{text!r} is not an address, an IPv4 wildcard or a network") from None


@dataclass(frozen=True)
class TrustTable:
    """Trusted networks with their keywords, most specific first."""

    entries: tuple[tuple[IPNetwork, str], ...] = ()

    @classmethod
    def build(cls, entries: list[tuple[IPNetwork, str]]) -> "TrustTable":
        return cls(tuple(sorted(entries, key=lambda entry: -entry[0].prefixlen)))

    def keyword_for(self, client_ip: str) -> str | None:
        """The keyword of the most specific entry containing ``client_ip``, or None."""
        address = parse_client_address(client_ip)
        if address is None:
            return None
        for network, keyword in self.entries:
            if address.version == network.version and address in network:
                return keyword
        return None

    def __len__(self) -> int:
        return len(self.entries)
