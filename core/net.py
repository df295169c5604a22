"""Listening sockets: E-MailRelay's ``--interface`` list turned into bound sockets.

Sockets are bound before the daemon detaches, so "address in use" reaches the shell that
started it (exit code 2, as E-MailRelay does).
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct
from pathlib import Path

SIOCGIFADDR = 0x8915
LISTEN_BACKLOG = 1024


class BindError(OSError):
    """A listening address could not be bound (exit code 2)."""


def addresses_for(kind: str, interface_list: list[str], *, any_default: bool) -> list[str]:
    """Addresses to listen on for ``kind`` (``smtp``, ``pop``, ``admin``) from ``--interface``.

    An item ``kind=ADDR`` applies to that listener only, a bare item to all of them; an item may
    be an IP address or an interface name (``eth0``, ``lo-ipv4``). With no items: every address
    when remote clients are allowed, else loopback only.
    """
    items: list[str] = []
    for item in interface_list:
        prefix, sep, value = item.partition("=")
        if sep:
            if prefix not in ("smtp", "pop", "admin"):
                raise ValueError(f"--interface {item!r}: unknown listener {prefix!r} (smtp, pop or admin)")
            if prefix == kind:
                items.append(value)
        else:
            items.append(item)
    if not interface_list:
        return ["0.0.0.0", "::"] if any_default else ["127.0.0.1"]
    out: list[str] = []
    for item in items:
        out += _expand(item)
    return list(dict.fromkeys(out))


def _expand(item: str) -> list[str]:
    try:
        ipaddress.ip_address(item.split("%")[0])
        return [item]
    except ValueError:
        pass
    name, family = item, None
    for suffix, fam in (("-ipv4", 4), ("-ipv6", 6)):
        if item.endswith(suffix):
            name, family = item[: -len(suffix)], fam
    found = (_ipv4_of(name) if family in (None, 4) else []) + (_ipv6_of(name) if family in (None, 6) else [])
    if not found:
        raise ValueError(f"--interface {item!r} is neither an IP address nor an interface with an address")
    return found


def _ipv4_of(name: str) -> list[str]:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            req = struct.pack("256s", name.encode()[:15])
            return [socket.inet_ntoa(fcntl.ioctl(s.fileno(), SIOCGIFADDR, req)[20:24])]
    except OSError:
        return []


def _ipv6_of(name: str) -> list[str]:
    out = []
    try:
        lines = Path("/proc/net/if_inet6").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        parts = line.split()
        if len(parts) >= 6 and parts[5] == name:
            addr = str(ipaddress.IPv6Address(bytes.fromhex(parts[0])))
            out.append(f"{addr}%{name}" if addr.startswith("fe80") else addr)
    return out


def bind(address: str, port: int) -> socket.socket:
    """A non-blocking listening TCP socket on ``address:port``."""
    host = address.split("%")[0]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            info = socket.getaddrinfo(address, port, family, socket.SOCK_STREAM)[0][4]
            sock.bind(info)
        else:
            sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise BindError(e.errno, f"cannot listen on {address} port {port}: {e.strerror}") from None
    return sock


def describe(sock: socket.socket) -> str:
    addr = sock.getsockname()
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
