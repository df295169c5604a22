"""Forwarding through a SOCKS proxy: E-MailRelay's ``--forward-to host:port@socks-host:socks-port``.

The part after ``@`` names the proxy; ``socks5://`` (the default) or ``socks4a://`` in front of it
picks the protocol. The next hop's name is handed to the proxy unresolved (SOCKS5 with a domain
name, or SOCKS4a), so the proxy resolves it: with Tor the relay's own resolver never sees the
destination, which is the point of E-MailRelay's feature. python-socks does the handshake and
yields a connected socket that aiosmtplib then talks SMTP over (``sock=``).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Literal

from python_socks import ProxyConnectionError, ProxyError, ProxyTimeoutError, ProxyType
from python_socks.async_.asyncio import Proxy

_SCHEMES: dict[str, Literal["socks5", "socks4a"]] = {"socks5": "socks5", "socks4a": "socks4a"}


class SocksError(Exception):
    """The proxy could not be reached, or refused to connect us to the next hop."""


@dataclass(frozen=True)
class SocksProxy:
    """A SOCKS server to connect through."""

    host: str
    port: int
    version: Literal["socks5", "socks4a"] = "socks5"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.version}://{host}:{self.port}"


def split_proxy(text: str) -> tuple[str, str, Literal["socks5", "socks4a"]]:
    """``"far:25@socks4a://proxy:1080"`` to ``("far:25", "proxy:1080", "socks4a")``; no ``@``
    gives an empty proxy part. The split is at the last ``@``: host names cannot contain one."""
    target, at, proxy = text.rpartition("@")
    if not at:
        return text, "", "socks5"
    if not proxy:
        raise ValueError(f"{text!r}: no SOCKS proxy after '@'")
    scheme, sep, rest = proxy.partition("://")
    if not sep:
        return target, proxy, "socks5"
    version = _SCHEMES.get(scheme.lower())
    if version is None:
        raise ValueError(f"{text!r}: unknown proxy scheme {scheme!r} (use socks5:// or socks4a://)")
    return target, rest, version


async def open_through(proxy: SocksProxy, host: str, port: int, *, timeout: float,
                       local_address: str = "") -> socket.socket:
    """A socket connected to ``host:port`` through ``proxy`` (``host`` resolved by the proxy).

    Raises :class:`SocksError` with a readable reason on any failure, within ``timeout`` seconds.
    """
    kind = ProxyType.SOCKS5 if proxy.version == "socks5" else ProxyType.SOCKS4
    connector = Proxy(kind, proxy.host, proxy.port, rdns=True)  # rdns: the proxy resolves names
    try:
        return await connector.connect(host, port, timeout=timeout,
                                       local_addr=(local_address, 0) if local_address else None)
    except ProxyTimeoutError:
        raise SocksError(f"SOCKS proxy {proxy}: no connection to {host}:{port} within {timeout:g} s") from None
    except ProxyConnectionError as e:
        raise SocksError(f"SOCKS proxy {proxy} unreachable: {e}") from None
    except ProxyError as e:
        raise SocksError(f"SOCKS proxy {proxy} refused to connect to {host}:{port}: {e}") from None
    except OSError as e:
        raise SocksError(f"SOCKS proxy {proxy}: {e}") from None
