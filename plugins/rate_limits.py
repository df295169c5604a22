"""``rate-limits``: how many messages and recipients one client address may send.

    [plugins]
    enable = ["rate-limits"]

    [rate_limits]
    messages = 100          # MAIL FROM commands per client address per window; 0 = no limit
    recipients = 500        # RCPT TO commands per client address per window; 0 = no limit
    window = 3600           # seconds
    exempt = ["127.0.0.0/8", "::1/128"]   # addresses and networks that are never limited
    max_clients = 100000    # addresses remembered at once

Each address has a token bucket per limit: it holds up to the limit, and refills at the limit per
window, so a client that has used its allowance gets one more message every ``window / messages``
seconds and its whole allowance back after a quiet window. Attempts are counted (a MAIL FROM or
RCPT TO that reaches this plugin), not deliveries. Over the limit the command gets
``450 4.7.1`` with the limit in the text; the session stays open.

The address is the session's ``peer_ip``: the real client's when the relay sits behind a PROXY
protocol load balancer. Memory is bounded: past ``max_clients`` addresses the least recently seen
one is forgotten (so its next message starts with a full allowance).

This is policy, so it is a plugin: an operator who does not want it does not enable it. Connection
counts are the core server's job (``[smtp] max_connections``, ``max_connections_per_client``),
because the server already counts sessions and must refuse before any plugin runs.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Union

from mailrelay_sdk import Recipient, Session, Transaction, Verdict, hookimpl

from mailrelay.config.loader import ConfigError

log = logging.getLogger("mailrelay.rate_limits")

SECTION = "rate_limits"
Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


@dataclass
class RateLimitSettings:
    """``[rate_limits]``: per-client-address allowances."""

    messages: int = 100
    recipients: int = 500
    window: float = 3600.0
    exempt: list[str] = field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    max_clients: int = 100_000


class Buckets:
    """Token buckets keyed by client address, at most ``max_clients`` of them (least recently
    used forgotten first)."""

    def __init__(self, limit: int, window: float, max_clients: int,
                 clock: Callable[[], float] = time.monotonic):
        self.limit, self.rate, self.max_clients, self.clock = limit, limit / window, max_clients, clock
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()

    def take(self, key: str) -> bool:
        """Use one token of ``key``'s allowance; False if none is left."""
        now = self.clock()
        tokens, then = self._buckets.pop(key, (float(self.limit), now))
        tokens = min(float(self.limit), tokens + (now - then) * self.rate)
        allowed = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if allowed else tokens, now)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return allowed

    def __len__(self) -> int:
        return len(self._buckets)


class RateLimitsPlugin:
    """One instance per relay (the entry point names the class)."""

    def __init__(self) -> None:
        self.settings = RateLimitSettings()
        self.exempt: tuple[Network, ...] = ()
        self.messages: Buckets | None = None
        self.recipients: Buckets | None = None

    @hookimpl
    def relay_config_schema(self) -> dict[str, type]:
        return {SECTION: RateLimitSettings}

    @hookimpl
    def relay_startup(self, relay: Any) -> None:
        settings: RateLimitSettings = relay.plugin_settings(SECTION)
        if settings.window <= 0 or settings.messages < 0 or settings.recipients < 0 or settings.max_clients < 1:
            raise ConfigError(f"[{SECTION}]: window and max_clients must be positive, limits 0 or more")
        try:
            self.exempt = tuple(ipaddress.ip_network(n.strip(), strict=False) for n in settings.exempt)
        except ValueError as e:
            raise ConfigError(f"[{SECTION}] exempt: {e}") from None
        self.settings = settings
        self.messages = Buckets(settings.messages, settings.window, settings.max_clients) \
            if settings.messages else None
        self.recipients = Buckets(settings.recipients, settings.window, settings.max_clients) \
            if settings.recipients else None
        log.info("rate limits: messages=%d recipients=%d per %gs per client address; exempt %s",
                 settings.messages, settings.recipients, settings.window,
                 ",".join(settings.exempt) or "(none)")

    def _exempt(self, peer_ip: str) -> bool:
        try:
            address = ipaddress.ip_address(peer_ip.split("%")[0])
        except ValueError:  # a Unix-socket client: local
            return True
        return any(address in network for network in self.exempt)

    def _check(self, buckets: Buckets | None, session: Session, what: str) -> Verdict | None:
        if buckets is None or self._exempt(session.peer_ip) or buckets.take(session.peer_ip):
            return None
        limit = self.settings.messages if what == "messages" else self.settings.recipients
        log.info("session=%s client=%s rate limited: more than %d %s per %gs", session.id, session.peer_ip,
                 limit, what, self.settings.window)
        return Verdict.deny_soft(f"Too many {what} from your address (limit {limit} per "
                                 f"{self.settings.window:g} seconds), try again later",
                                 code=450, enhanced="4.7.1", reason=f"{what} rate limit")

    @hookimpl
    def on_mail_from(self, session: Session, transaction: Transaction) -> Verdict | None:
        return self._check(self.messages, session, "messages")

    @hookimpl
    def on_rcpt_to(self, session: Session, recipient: Recipient) -> Verdict | None:
        return self._check(self.recipients, session, "recipients")
