"""The ``[auth]`` section and E-MailRelay's ``--server-auth-config`` mechanism lists."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from mailrelay.config.loader import ConfigError
from mailrelay.secrets import parse_auth_config

from .throttle import ThrottlePolicy

#: Mechanisms this plugin can check, in the order E-MailRelay advertises them.
MECHANISMS = ("CRAM-MD5", "PLAIN", "LOGIN")
#: Names E-MailRelay builds may know; accepted in --server-auth-config, never offered here.
FOREIGN_MECHANISMS = ("CRAM-SHA1", "CRAM-SHA256", "CRAM-SHA512", "APOP", "XOAUTH2")
PAM_PREFIX = "pam:"



class LoginPolicy:
    """What every service that logs users in shares (SMTP AUTH, POP3, admin): PAM selection and
    failure throttling. Mixed into settings dataclasses that have the ``pam_service`` and
    ``throttle_*`` fields and name their password source (secrets file or ``pam:``) in
    ``login_source``."""

    pam_service: str
    throttle_window: float
    throttle_delay_after: int
    throttle_delay: float
    throttle_max_delay: float
    throttle_disconnect_after: int
    throttle_max_tracked: int

    @property
    def login_source(self) -> str:
        raise NotImplementedError

    @property
    def uses_pam(self) -> bool:
        return self.login_source.lower().startswith(PAM_PREFIX)

    @property
    def effective_pam_service(self) -> str:
        """``pam:SERVICE`` names the service; plain ``pam:`` uses ``pam_service``."""
        return self.login_source[len(PAM_PREFIX):] or self.pam_service

    @property
    def throttle_policy(self) -> ThrottlePolicy:
        return ThrottlePolicy(self.throttle_window, self.throttle_delay_after, self.throttle_delay,
                              self.throttle_max_delay, self.throttle_disconnect_after, self.throttle_max_tracked)

    def throttle_checks(self) -> list[tuple[bool, str, str]]:
        """``(ok, key, problem)`` rows for the section's validation."""
        return [
            (self.throttle_window > 0, "throttle_window", "must be positive"),
            (self.throttle_delay_after >= 0, "throttle_delay_after", "must not be negative"),
            (self.throttle_delay >= 0, "throttle_delay", "must not be negative"),
            (self.throttle_max_delay >= 0, "throttle_max_delay", "must not be negative"),
            (self.throttle_disconnect_after >= 1, "throttle_disconnect_after", "must be at least 1"),
            (self.throttle_max_tracked >= 2, "throttle_max_tracked", "must be at least 2"),
        ]

@dataclass(frozen=True)
class MechanismPolicy:
    """``--server-auth-config`` parsed: allow and deny lists without TLS and once under TLS.

    E-MailRelay's syntax is ``;``-separated items ``KEY:NAME,NAME``: ``m`` allows and ``x``
    denies mechanisms without TLS; ``a`` allows and ``d`` denies them under TLS. Without any
    ``a`` or ``d`` item, ``m`` and ``x`` apply to both. An allow list keeps only the mechanisms
    it names (an empty one, ``m:``, offers none); a missing one keeps all, except that without
    TLS (and not on loopback, see ``loopback_is_secure``) nothing is offered unless an ``m`` item
    names it: passwords do not cross a network in clear by default, where E-MailRelay would
    offer everything. ``a:plain,login`` offers nothing until STARTTLS, then PLAIN and LOGIN;
    ``m:cram-md5`` allows CRAM-MD5 in clear. ``None`` below means "no allow list".
    """

    allow: tuple[str, ...] | None = ()
    deny: tuple[str, ...] = ()
    tls_allow: tuple[str, ...] | None = None
    tls_deny: tuple[str, ...] = ()

    def apply(self, usable: list[str], secure: bool) -> list[str]:
        """``usable`` (the backend's mechanisms, in order) filtered by the lists for ``secure``."""
        allow, deny = (self.tls_allow, self.tls_deny) if secure else (self.allow, self.deny)
        return [m for m in usable if (allow is None or m in allow) and m not in deny]


def parse_server_auth_config(text: str) -> MechanismPolicy:
    """Parse E-MailRelay's ``--server-auth-config`` value (case-insensitive); ConfigError if bad."""
    items = parse_auth_config(text, "--server-auth-config", MECHANISMS, FOREIGN_MECHANISMS, "m:;a:plain,login")
    allow, deny = items.get("M"), items.get("X", ())
    # Unlike E-MailRelay, nothing is offered on an insecure channel unless an m: item says so.
    insecure = allow if allow is not None else ()
    if "A" in items or "D" in items:
        return MechanismPolicy(insecure, deny, items.get("A"), items.get("D", ()))
    return MechanismPolicy(insecure, deny, allow, deny)


@dataclass
class AuthSettings(LoginPolicy):
    """``[auth]``: SMTP AUTH for clients of this relay (``--server-auth``)."""

    server_auth: str = ""            # --server-auth: an E-MailRelay secrets file, or "pam:" ("pam:SERVICE")
    server_auth_config: str = ""     # --server-auth-config: "m:...;x:...;a:...;d:..." (see MechanismPolicy)
    pam_service: str = "relay"       # the /etc/pam.d/ file used by "pam:" (E-MailRelay's is "emailrelay")
    require: bool = True             # MAIL needs AUTH unless the client address is trusted (E-MailRelay)
    loopback_is_secure: bool = True  # loopback clients get the TLS mechanism list (no password on a wire)
    failure_delay: float = 1.0       # every failed AUTH is answered no sooner than this (equal timing)
    throttle_window: float = 900.0   # seconds a failure is remembered
    throttle_delay_after: int = 3    # failures (per client address or user) before attempts are delayed
    throttle_delay: float = 1.0      # the first delay, doubled with each further failure ...
    throttle_max_delay: float = 8.0  # ... up to this
    throttle_disconnect_after: int = 10  # failures before AUTH is answered 421 and the client dropped
    throttle_max_tracked: int = 10000    # client addresses and user names remembered
    workers: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))  # threads for hashing and PAM

    def __post_init__(self) -> None:
        self.mechanism_policy = parse_server_auth_config(self.server_auth_config)
        checks = [
            (self.failure_delay >= 0, "failure_delay", "must not be negative"),
            *self.throttle_checks(),
            (1 <= self.workers <= 64, "workers", "must be 1 to 64"),
        ]
        for ok, key, problem in checks:
            if not ok:
                raise ConfigError(f"[auth] {key}: {problem}")

    @property
    def login_source(self) -> str:
        return self.server_auth
