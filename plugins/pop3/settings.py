"""The ``[pop3]`` section: E-MailRelay's ``--pop...`` options plus what a POP3 server needs."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from mailrelay.config.loader import ConfigError

from mailrelay_plugins.auth.settings import LoginPolicy



@dataclass
class Pop3Settings(LoginPolicy):
    """``[pop3]``: the POP3 server (``--pop``)."""

    port: int = 110                  # --pop-port; 0 picks a free port
    tls_port: int = 0                # --pop-tls-port: POP3S (TLS from the first byte, 995); 0 = none
    auth: str = ""                   # --pop-auth: an E-MailRelay secrets file ("server" lines), or "pam:"
    pam_service: str = "relay"       # for "pam:" ("pam:SERVICE" names another)
    by_name: bool = False            # --pop-by-name: user X gets the mailbox <directory>/X
    no_delete: bool = False          # --pop-no-delete: DELE appears to succeed; nothing is removed
    directory: str = ""              # mailboxes for by_name; default: [filters] delivery_dir, else the spool
    allow_plaintext: bool = False    # USER/PASS and AUTH PLAIN over a network without TLS
    loopback_is_secure: bool = True  # loopback clients may log in without TLS (their password crosses no wire)
    apop: bool = True                # offer APOP when the secrets file has plain passwords
    idle_timeout: float = 600.0      # RFC 1939 3: an autologout timer of at least 10 minutes
    max_connections: int = 100       # sessions at once; the next one gets -ERR [SYS/TEMP]
    shutdown_grace: float = 10.0     # seconds a QUIT being committed gets on SIGTERM
    failure_delay: float = 1.0       # a failed login is answered no sooner than this
    throttle_window: float = 900.0   # failed logins per client address and per user, as [auth] ...
    throttle_delay_after: int = 3
    throttle_delay: float = 1.0
    throttle_max_delay: float = 8.0
    throttle_disconnect_after: int = 10
    throttle_max_tracked: int = 10000
    workers: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))  # threads for hashes and PAM

    def __post_init__(self) -> None:
        checks = [
            (0 <= self.port <= 65535, "port", "must be 0 to 65535"),
            (0 <= self.tls_port <= 65535, "tls_port", "must be 0 (none) to 65535"),
            (1 <= self.idle_timeout <= 86400, "idle_timeout", "must be 1 to 86400 seconds"),
            (0 <= self.max_connections <= 10**6, "max_connections", "must be 0 (no limit) to 1000000"),
            (0 <= self.shutdown_grace <= 3600, "shutdown_grace", "must be 0 to 3600 seconds"),
            (self.failure_delay >= 0, "failure_delay", "must not be negative"),
            *self.throttle_checks(),
            (1 <= self.workers <= 64, "workers", "must be 1 to 64"),
        ]
        for ok, key, problem in checks:
            if not ok:
                raise ConfigError(f"[pop3] {key}: {problem}")
        if self.tls_port and self.tls_port == self.port:
            raise ConfigError("[pop3] tls_port: must differ from port")

    @property
    def login_source(self) -> str:
        return self.auth
