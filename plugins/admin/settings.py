"""The ``[admin]`` section: where the admin web server listens, TLS, logins and limits."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field

from mailrelay.config.loader import ConfigError

DEFAULT_PORT = "8025"
TOKENS_FILE_NAME = "admin-tokens.json"


@dataclass(frozen=True)
class ListenAddress:
    """One ``[admin] listen`` item: ``host`` is empty for a bare port (addresses then come from
    ``--interface admin=ADDR``, else loopback)."""

    host: str
    port: int


def parse_listen(item: str) -> ListenAddress:
    """``"8025"``, ``"127.0.0.1:8025"`` or ``"[::1]:8025"``; ConfigError when malformed."""
    text = str(item).strip()
    host, port = "", text
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ConfigError(f"[admin] listen: {item!r}: expected [IPV6]:PORT")
    elif ":" in text:
        host, _, port = text.rpartition(":")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"[admin] listen: {item!r}: expected PORT, ADDRESS:PORT or [IPV6]:PORT")
    if host:
        try:
            ipaddress.ip_address(host.split("%")[0])
        except ValueError:
            raise ConfigError(f"[admin] listen: {item!r}: {host!r} is not an IP address") from None
    return ListenAddress(host, int(port))


@dataclass
class AdminSettings:
    """``[admin]``: the admin web UI and JSON API (``--admin PORT``)."""

    listen: list[str] = field(default_factory=lambda: [DEFAULT_PORT])  # --admin PORT; or "ADDR:PORT"
    tls_certificate: str = ""     # PEM with the key and chain (or the chain, with tls_key): HTTPS
    tls_key: str = ""
    auth: str = ""                # secrets file or "pam:"/"pam:SERVICE"; default: [auth] server_auth
    pam_service: str = ""         # for a bare "pam:"; default: [auth] pam_service, else "relay"
    tokens_file: str = ""         # API tokens (hashed); default: <spool dir>/admin-tokens.json
    session_lifetime: float = 8 * 3600.0  # seconds a UI login lasts
    threads: int = 8              # worker threads of the HTTP server (one per request in flight)
    max_streams: int = 4          # event streams at once (each holds a thread while open)
    events: int = 1000            # recent events kept for /api/v1/events and the dashboard
    terminate: bool = False       # --admin-terminate: POST /api/v1/terminate stops the relay

    def __post_init__(self) -> None:
        self.addresses = [parse_listen(item) for item in self.listen]
        if not self.addresses:
            raise ConfigError("[admin] listen: give at least one PORT or ADDRESS:PORT")
        checks = [
            (60 <= self.session_lifetime <= 30 * 86400, "session_lifetime", "must be 60 s to 30 days"),
            (2 <= self.threads <= 256, "threads", "must be 2 to 256"),
            (0 <= self.max_streams < self.threads, "max_streams", "must be at least 0 and below threads"),
            (10 <= self.events <= 1_000_000, "events", "must be 10 to 1000000"),
        ]
        for ok, key, problem in checks:
            if not ok:
                raise ConfigError(f"[admin] {key}: {problem}")
        if self.tls_key and not self.tls_certificate:
            raise ConfigError("[admin] tls_key: needs tls_certificate")
        # Absolute now: the daemon changes directory to "/".
        for key in ("tls_certificate", "tls_key", "tokens_file"):
            value = getattr(self, key)
            if value:
                setattr(self, key, os.path.abspath(os.path.expanduser(value)))
        if self.auth and not self.auth.lower().startswith("pam:"):
            self.auth = os.path.abspath(os.path.expanduser(self.auth))

    @property
    def https(self) -> bool:
        return bool(self.tls_certificate)

    def tokens_path(self, spool_dir: str) -> str:
        return self.tokens_file or os.path.join(os.path.abspath(spool_dir), TOKENS_FILE_NAME)
