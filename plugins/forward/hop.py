"""Where the forwarding client connects, and the TLS each place needs.

A :class:`Hop` is one address to try (or, through a SOCKS proxy, a name the proxy resolves); its
:class:`TlsRequirement` comes from ``[forward] tls`` for a smarthost and from DANE or MTA-STS
(``security.py``) for an MX host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .dane import Tlsa
from .socks import SocksProxy


@dataclass(frozen=True)
class TlsRequirement:
    """The TLS one hop needs.

    ``level``: ``default`` follows ``[forward] tls``; ``encrypt`` requires STARTTLS without
    checking the certificate; ``verify`` requires a certificate that verifies (system CAs plus
    ``ca_file``) for ``name``; ``dane`` requires one that matches ``tlsa`` (names: ``name`` and
    ``extra_names``). ``source`` names the rule for messages ("MTA-STS policy of example.com").
    ``testing``: a failure is logged and the hop is tried again at the default level (MTA-STS
    ``mode: testing``).
    """

    level: Literal["default", "encrypt", "verify", "dane"] = "default"
    name: str = ""
    extra_names: tuple[str, ...] = ()
    tlsa: tuple[Tlsa, ...] = ()
    source: str = ""
    testing: bool = False


DEFAULT_TLS = TlsRequirement()
SECURITY_STATUS = "4.7.5"  # RFC 3463 "cryptographic failure": what MTA-STS and DANE failures report


@dataclass(frozen=True)
class Hop:
    """One place to try: an address (or, through a proxy, a name the proxy resolves) and port,
    the host name it stands for (SNI and certificate checks), a SOCKS proxy, the TLS it needs."""

    host: str
    port: int
    name: str = ""
    proxy: SocksProxy | None = None
    tls: TlsRequirement = DEFAULT_TLS

    def __str__(self) -> str:
        where = f"{self.host}:{self.port}" if not self.name or self.name == self.host else \
            f"{self.name}[{self.host}]:{self.port}"
        return where + (f" via {self.proxy}" if self.proxy else "")


class HopError(Exception):
    """The destination could not be used at all (connect, greeting, EHLO, TLS): try the next one.
    ``status`` is the RFC 3463 code reported if no hop works."""

    def __init__(self, message: str, status: str = "4.4.1"):
        super().__init__(message)
        self.status = status
