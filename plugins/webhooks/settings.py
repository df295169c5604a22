"""``[webhooks.NAME]`` settings: one table per endpoint, validated when the configuration loads."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from mailrelay.config.loader import ConfigError
from mailrelay.queue.schedule import parse_duration

# A hook's name is part of its outbox file names: no separators, no dots.
HOOK_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
DEFAULT_EVENTS = ["message.delivered", "message.bounced", "message.deferred", "message.expired"]


@dataclass
class WebhookSettings:
    """One endpoint. Durations take ``s``/``m``/``h``/``d`` suffixes (``"30s"``, ``"2h"``)."""

    url: str = ""                   # http(s)://host[:port]/path; user:password@ sends HTTP Basic auth
    events: list[str] = field(default_factory=lambda: list(DEFAULT_EVENTS))  # names or globs ("message.*")
    secret: str = ""                # HMAC-SHA256 key for X-Relay-Signature (required)
    ca_file: str = ""               # PEM CA bundle for https (default: the system's trust store)
    timeout: float = 10.0           # seconds for one POST (connect, send, status line)
    concurrency: int = 4            # POSTs in flight at once to this endpoint
    retry_initial: str = "10s"      # the first retry waits this long; each later one twice as long...
    retry_max: str = "10m"          # ...but never longer than this
    max_age: str = "1d"             # an event still undelivered this long after it happened is dropped
    allow_http: bool = False        # plain http to a host other than loopback (the payload is readable)

    def __post_init__(self) -> None:
        where = f"[webhooks] url {self.url!r}"
        if not self.url:
            raise ConfigError("[webhooks.NAME] url: every webhook needs a url")
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{where}: expected http://HOST[:PORT]/PATH or https://...")
        if any(ord(c) <= 32 or ord(c) == 127 for c in self.url):
            raise ConfigError(f"{where}: spaces and control characters must be percent-encoded")
        try:
            parts.port
        except ValueError:
            raise ConfigError(f"{where}: bad port") from None
        if parts.scheme == "http" and not self.allow_http and not is_loopback_host(parts.hostname):
            raise ConfigError(f"{where}: plain http sends mail addresses readable on the network; use https "
                              "(or allow_http = true)")
        if not self.secret:
            raise ConfigError(f"{where}: needs a secret (the key receivers check X-Relay-Signature with)")
        if not self.events or not all(isinstance(e, str) and e.strip() for e in self.events):
            raise ConfigError(f"{where}: events must list event names (or patterns such as \"message.*\")")
        if not 0 < self.timeout <= 600:
            raise ConfigError(f"{where}: timeout {self.timeout:g} is out of range (0, 600] seconds")
        if not 1 <= self.concurrency <= 64:
            raise ConfigError(f"{where}: concurrency {self.concurrency} is out of range 1..64")
        for key in ("retry_initial", "retry_max", "max_age"):
            try:
                if parse_duration(getattr(self, key)) <= 0:
                    raise ValueError(f"{getattr(self, key)!r} is not a positive duration")
            except ValueError as e:
                raise ConfigError(f"{where}: {key}: {e}") from None
        if self.retry_max_seconds < self.retry_initial_seconds:
            raise ConfigError(f"{where}: retry_max is shorter than retry_initial")

    @property
    def retry_initial_seconds(self) -> float:
        return parse_duration(self.retry_initial)

    @property
    def retry_max_seconds(self) -> float:
        return parse_duration(self.retry_max)

    @property
    def max_age_seconds(self) -> float:
        return parse_duration(self.max_age)


def is_loopback_host(host: str) -> bool:
    """``localhost`` or a loopback address literal (a name is not resolved to decide)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_names(hooks: dict[str, WebhookSettings]) -> None:
    """Hook names end up in file names: refuse anything but letters, digits, ``-`` and ``_``."""
    for name in hooks:
        if not HOOK_NAME.fullmatch(name):
            raise ConfigError(f"[webhooks.{name}]: a webhook name may use letters, digits, - and _ "
                              "(up to 64)")
