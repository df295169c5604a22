"""Logins for the POP3 server, with the ``auth`` plugin's parts: the E-MailRelay secrets file
(``server`` lines: plain passwords, md5 secrets, bcrypt/argon2/scrypt hashes) or PAM, and the
same throttling of failed attempts per client address and per user name.

USER/PASS and AUTH PLAIN check a password; APOP (RFC 1939 7) answers a challenge, which needs the
password itself, so only ``server plain`` accounts can use it. An unknown user is checked
against a decoy secret of the same kind and every failure takes at least ``failure_delay``, so
neither the reply nor its timing says whether a user exists. Checks run in worker threads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import hashlib
import hmac
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable

from mailrelay_plugins.auth.backend import Backend, Outcome, SecretsFileBackend
from mailrelay_plugins.auth.pam_backend import PamBackend
from mailrelay_plugins.auth.throttle import Login, Throttle, client_key, throttled_login

from .settings import Pop3Settings

log = logging.getLogger("mailrelay.pop3")

MAX_USERNAME = 255
MAX_CREDENTIAL = 1024
RECHECK = 1.0  # seconds between looks at whether the secrets file changed


class Result(enum.Enum):
    OK = "ok"
    FAILED = "failed"        # wrong credentials or unknown user: -ERR [AUTH]
    TEMPORARY = "temporary"  # the backend could not decide (PAM down): -ERR [SYS/TEMP]
    LOCKED = "locked"        # too many failures: -ERR [SYS/TEMP], and the connection is closed


@dataclass(frozen=True)
class Attempt:
    """Who tries: for the throttle, the log and events."""

    session: str
    peer_ip: str
    username: str
    mechanism: str  # USER, PLAIN or APOP


def malformed(username: str, secret: str) -> str:
    """Why a user name or password can never match (kept short of the backends), or ``""``."""
    if not username or len(username) > MAX_USERNAME or any(ord(c) < 32 or ord(c) == 127 for c in username):
        return "malformed user name"
    if len(secret) > MAX_CREDENTIAL or "\0" in secret:
        return "malformed password"
    return ""


class Authenticator:
    """Checks POP3 logins; one per server."""

    def __init__(self, settings: Pop3Settings, emit: Callable[..., None]):
        self.settings = settings
        self.throttle = Throttle(settings.throttle_policy)
        self._emit = emit
        self._executor = concurrent.futures.ThreadPoolExecutor(settings.workers, thread_name_prefix="pop3-auth")
        self.backend: Backend | None = None
        self._checked = 0.0

    def load(self) -> None:
        """Open the secrets file or PAM (blocking; ConfigError names the problem)."""
        if self.settings.uses_pam:
            self.backend = PamBackend(self.settings.effective_pam_service)
            log.info("pop3: logins through PAM service %s", self.settings.effective_pam_service)
            return
        backend = SecretsFileBackend(self.settings.auth)
        if not backend.accounts.by_name:
            log.warning("pop3: %s has no 'server' accounts: nobody can log in", self.settings.auth)
        log.info("pop3: secrets file %s accounts=%d apop=%s", self.settings.auth, len(backend.accounts.by_name),
                 "yes" if self._has_plain(backend) else "no")
        self.backend = backend

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    @staticmethod
    def _has_plain(backend: Backend) -> bool:
        return isinstance(backend, SecretsFileBackend) and "plain" in backend.accounts.kinds

    @property
    def apop_available(self) -> bool:
        """APOP can be offered: the secrets file holds plain passwords (not PAM, not only hashes)."""
        return self.settings.apop and self.backend is not None and self._has_plain(self.backend)

    # ---------------------------------------------------------------- checks
    async def password(self, attempt: Attempt, password: str) -> Result:
        """USER/PASS or AUTH PLAIN."""
        return await self._attempt(attempt, malformed(attempt.username, password), self._check_password, password)

    async def apop(self, attempt: Attempt, timestamp: str, digest: str) -> Result:
        """APOP: ``digest`` must be MD5(timestamp + password) in hex."""
        return await self._attempt(attempt, malformed(attempt.username, digest), self._check_apop, timestamp, digest)

    def _refresh(self) -> None:
        if self.backend is not None and time.monotonic() - self._checked >= RECHECK:
            self._checked = time.monotonic()
            self.backend.refresh()

    def _check_password(self, username: str, password: str) -> Outcome:
        assert self.backend is not None
        self._refresh()
        return self.backend.check("PLAIN", username, password, None, None)

    def _check_apop(self, username: str, timestamp: str, digest: str) -> Outcome:
        backend = self.backend
        if not isinstance(backend, SecretsFileBackend):
            return Outcome(False, "APOP needs a secrets file")
        self._refresh()
        secret = backend.accounts.by_name.get(username, {}).get("plain")
        password = secret.secret if secret is not None else os.urandom(16).hex()
        expected = hashlib.md5((timestamp + password).encode("utf-8")).hexdigest()
        if hmac.compare_digest(expected.encode("ascii"), digest.lower().encode("utf-8")) and secret is not None:
            return Outcome(True)
        if secret is None:
            known = username in backend.accounts.by_name
            return Outcome(False, "no plain password for APOP" if known else "unknown user")
        return Outcome(False, "wrong password")

    async def _attempt(self, attempt: Attempt, problem: str, check: Callable[..., Outcome], *args: str) -> Result:
        async def checked() -> Outcome:
            if problem:
                return Outcome(False, problem)
            return await asyncio.get_running_loop().run_in_executor(self._executor, check, attempt.username, *args)

        result = await throttled_login(
            self.throttle, attempt.peer_ip, attempt.username, checked, failure_delay=self.settings.failure_delay,
            on_failure=lambda reason, failures: self._failed(attempt, reason, failures),
            logger=log, context=f"session={attempt.session} pop3 login")
        if result.login is Login.OK:
            self._emit("auth.succeeded", session=attempt.session, client=attempt.peer_ip, user=attempt.username,
                       mechanism=attempt.mechanism, protocol="pop3")
            return Result.OK
        if result.login is Login.TEMPORARY:
            log.error("session=%s client=%s pop3 login could not be checked user=%s: %s", attempt.session,
                      attempt.peer_ip, _quoted(attempt.username), result.reason)
            return Result.TEMPORARY
        return Result.LOCKED if result.login is Login.LOCKED else Result.FAILED

    def _failed(self, attempt: Attempt, reason: str, failures: int) -> None:
        log.warning("session=%s client=%s pop3 login failed user=%s mechanism=%s reason=%s failures=%d "
                    "throttle_key=%s", attempt.session, attempt.peer_ip, _quoted(attempt.username),
                    attempt.mechanism, _quoted(reason), failures, client_key(attempt.peer_ip))
        self._emit("auth.failed", session=attempt.session, client=attempt.peer_ip, user=attempt.username,
                   mechanism=attempt.mechanism, protocol="pop3", reason=reason, failures=failures)


def _quoted(text: str) -> str:
    return json.dumps(text[:100])
