"""mailrelay-greylist: greylisting for mailrelay.

A (client network, sender, recipient) triplet seen for the first time is refused with
``451 4.7.1``; the same triplet is accepted once ``delay`` seconds have passed since that first
attempt, as a real mail server retries and most spam software does not. A triplet that got
through is remembered for ``lifetime`` seconds, so regular correspondents are not delayed again.
The client network is the /24 of an IPv4 address (/64 for IPv6): large senders retry from
another host of the same farm. Authenticated clients and ``skip_networks`` are never greylisted.

    [plugins]
    enable = ["greylist"]

    [greylist]
    delay = 300              # seconds before a retry is accepted
    expire = 14400           # an unconfirmed triplet is forgotten after this many seconds
    lifetime = 3110400       # a confirmed one after this many seconds without mail (36 days)
    skip_networks = ["192.0.2.0/24"]
    database = ""            # default: greylist.sqlite3 in the spool directory

The state lives in SQLite, used from one worker thread so the event loop never waits on disk.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from mailrelay_sdk import Recipient, Relay, Session, Transaction, Verdict, hookimpl

from .store import Decision, TripletStore

__version__ = "0.1.0"


@dataclass
class Settings:
    """The ``[greylist]`` section of relay.conf."""

    delay: float = 300.0
    expire: float = 4 * 3600.0
    lifetime: float = 36 * 86400.0
    skip_networks: list[str] = field(default_factory=list)
    skip_authenticated: bool = True
    database: str = ""


def client_network(address: str) -> str:
    """The /24 (IPv4) or /64 (IPv6) network of ``address``, as text; the address itself when it is
    not an IP address (a Unix socket peer)."""
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return address
    prefix = 24 if ip.version == 4 else 64
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


class Plugin:
    """The entry point names this class; the relay makes one instance per relay."""

    #: The mailrelay versions this plugin works with (a PEP 440 specifier), checked at start-up.
    requires_core = ">=0.1"
    #: The hook spec version it was written for (``mailrelay_sdk.HOOKSPEC_VERSION``).
    hookspec_version = 1

    def __init__(self) -> None:
        self.settings = Settings()
        self.skip: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self.store: TripletStore | None = None

    @hookimpl
    def relay_config_schema(self) -> dict[str, type]:
        return {"greylist": Settings}

    @hookimpl
    async def relay_startup(self, relay: Relay) -> None:
        self.settings = relay.plugin_settings("greylist")
        if self.settings.delay < 0 or self.settings.expire <= self.settings.delay:
            raise ValueError("[greylist] needs 0 <= delay < expire")
        try:
            self.skip = [ipaddress.ip_network(n, strict=False) for n in self.settings.skip_networks]
        except ValueError as e:
            raise ValueError(f"[greylist] skip_networks: {e}") from None
        path = Path(self.settings.database or Path(relay.settings.spool.dir) / "greylist.sqlite3")
        self.store = TripletStore(path)
        await self.store.open()

    @hookimpl
    async def relay_shutdown(self) -> None:
        if self.store is not None:
            await self.store.close()

    def _skipped(self, session: Session) -> bool:
        if self.settings.skip_authenticated and session.auth_user:
            return True
        try:
            ip = ipaddress.ip_address(session.peer_ip.split("%")[0])
        except ValueError:
            return False
        return any(ip in network for network in self.skip)

    @hookimpl
    async def on_rcpt_to(self, session: Session, transaction: Transaction,
                         recipient: Recipient) -> Verdict | None:
        """451 for a new or too-early triplet; no opinion (let later plugins decide) otherwise."""
        if self.store is None or self._skipped(session):
            return None
        s = self.settings
        decision: Decision = await self.store.check(
            (client_network(session.peer_ip), transaction.sender.lower(), recipient.address.lower()),
            delay=s.delay, expire=s.expire, lifetime=s.lifetime)
        if decision.passed:
            return None
        wait = max(1, round(decision.retry_in))
        return Verdict.deny_soft(f"Greylisted, please try again in {wait} seconds", code=451, enhanced="4.7.1",
                                 reason=f"greylisted {client_network(session.peer_ip)}")
