"""``auth``: SMTP AUTH for clients of this relay, behind the ``on_auth`` hook (``--server-auth``).

Enabled by ``--server-auth FILE|pam:`` or ``[plugins] enable = ["auth"]`` with::

    [auth]
    server_auth = "/etc/mailrelay/auth.secrets"   # E-MailRelay secrets file, or "pam:"
    server_auth_config = "m:cram-md5;a:plain,login"  # optional: mechanisms without / with TLS

What it does for the core:

* ``on_auth``: checks PLAIN/LOGIN passwords and CRAM-MD5 answers (235 / 535 / 454), with
  throttling per client address and per user (delays, then 421 and disconnect);
* ``on_connect``: a client whose address a ``server none ADDRESS KEYWORD`` line trusts gets
  ``session.notes["trusted"] = KEYWORD`` (E-MailRelay hands that keyword to address verifiers);
* ``on_mail_from``: with ``[auth] require`` (the default, as in E-MailRelay), a client that has not
  authenticated and is not trusted gets ``530 5.7.0 Authentication required``;
* ``auth_mechanisms(session)``: the mechanisms to advertise in EHLO for this session (without or
  with TLS), for the core's AUTH command;
* ``relay passwd``: prints secrets-file hashes (``emailrelay-passwd``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
from typing import Any

import click

from mailrelay.config.loader import ConfigError
from mailrelay_sdk import Session, Verdict, hookimpl

from .backend import Backend, Outcome, SecretsFileBackend
from .pam_backend import PamBackend
from .passwd import passwd_command
from .settings import AuthSettings
from .throttle import Login, Throttle, ThrottlePolicy, client_key, throttled_login

log = logging.getLogger("mailrelay.auth")

AUTH_OK = Verdict.ok("Authentication successful", code=235, enhanced="2.7.0")
AUTH_FAILED = Verdict.deny("Authentication credentials invalid", code=535, enhanced="5.7.8")
AUTH_TEMPFAIL = Verdict.deny_soft("Temporary authentication failure", code=454, enhanced="4.7.0")
AUTH_LOCKED = Verdict.disconnect("Too many failed authentication attempts, try again later",
                                 code=421, enhanced="4.7.0")
AUTH_REQUIRED = Verdict.deny("Authentication required", code=530, enhanced="5.7.0")
UNKNOWN_MECHANISM = Verdict.deny("Unrecognized authentication type", code=504, enhanced="5.5.4")

MAX_USERNAME = 255       # characters; longer names, or names with control characters, never match
MAX_CREDENTIAL = 1024    # characters of a password or CRAM-MD5 answer
HASHING_ALLOWANCE = 5.0  # seconds kept free in the hook time limit for the password check itself


def _quoted(text: str) -> str:
    """A user name for a key=value log line: quoted, escaped, shortened."""
    return json.dumps(text[:100])


def _malformed(username: str, password: str | None, response: str | None) -> str:
    if not username or len(username) > MAX_USERNAME or any(ord(c) < 32 or ord(c) == 127 for c in username):
        return "malformed user name"
    if len(password or "") > MAX_CREDENTIAL or len(response or "") > MAX_CREDENTIAL or "\0" in (password or ""):
        return "malformed password"
    return ""


class AuthPlugin:
    """One instance per relay (the entry point names the class)."""

    def __init__(self) -> None:
        self.settings = AuthSettings()
        self.backend: Backend | None = None
        self.throttle = Throttle(ThrottlePolicy())
        self.recheck = 1.0  # seconds between looks at whether the secrets file changed
        self._relay: Any = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._checked = float("-inf")
        self._refreshing: asyncio.Future[None] | None = None

    # ---------------------------------------------------------------- registration and life cycle
    @hookimpl
    def relay_config_schema(self) -> dict[str, type]:
        return {"auth": AuthSettings}

    @hookimpl
    def relay_cli(self, cli: click.Group) -> None:
        cli.add_command(passwd_command)

    @hookimpl
    async def relay_startup(self, relay: Any) -> None:
        settings: AuthSettings = relay.plugin_settings("auth")
        if not settings.server_auth:
            raise ConfigError("[auth] server_auth: give a secrets file or pam: (--server-auth)")
        budget = settings.throttle_max_delay + settings.failure_delay + HASHING_ALLOWANCE
        if budget > relay.settings.plugins.hook_timeout:
            raise ConfigError(f"[auth] throttle_max_delay + failure_delay must stay {HASHING_ALLOWANCE:g}s below "
                              f"[plugins] hook_timeout ({relay.settings.plugins.hook_timeout:g}s), or slow "
                              "AUTH attempts would be answered 451")
        self.settings, self._relay = settings, relay
        self.throttle = Throttle(settings.throttle_policy)
        self._executor = concurrent.futures.ThreadPoolExecutor(settings.workers, thread_name_prefix="auth")
        loop = asyncio.get_running_loop()
        try:
            if settings.uses_pam:
                self.backend = await loop.run_in_executor(self._executor, PamBackend,
                                                          settings.effective_pam_service)
                log.info("auth: PAM service %s", settings.effective_pam_service)
            else:
                backend = await loop.run_in_executor(self._executor, SecretsFileBackend, settings.server_auth)
                accounts = backend.accounts
                if not accounts.by_name:
                    log.warning("auth: %s has no 'server' accounts: nobody can authenticate (only trusted "
                                "addresses can send)", settings.server_auth)
                log.info("auth: secrets file %s accounts=%d trusted_addresses=%d mechanisms=%s tls_mechanisms=%s",
                         settings.server_auth, len(accounts.by_name), len(accounts.trust),
                         ",".join(self._offered(backend, False)) or "-", ",".join(self._offered(backend, True)) or "-")
                self.backend = backend
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise

    @hookimpl
    async def relay_shutdown(self) -> None:
        if self._refreshing is not None:
            self._refreshing.cancel()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    # ---------------------------------------------------------------- helpers the core uses
    def mechanisms(self, secure: bool) -> list[str]:
        """Mechanisms to offer without TLS (``secure=False``) or under TLS, after
        ``--server-auth-config``."""
        return [] if self.backend is None else self._offered(self.backend, secure)

    def _offered(self, backend: Backend, secure: bool) -> list[str]:
        return self.settings.mechanism_policy.apply(backend.mechanisms(secure), secure)

    def secure(self, session: Session) -> bool:
        """Whether ``session`` gets the mechanisms for TLS: under TLS, or from loopback (unless
        ``[auth] loopback_is_secure = false``, E-MailRelay's behaviour)."""
        return session.tls or (self.settings.loopback_is_secure and session.is_loopback)

    @hookimpl
    def auth_mechanisms(self, session: Session) -> list[str]:
        """The mechanisms to offer ``session`` now (its EHLO reply, its AUTH command)."""
        return self.mechanisms(self.secure(session))

    async def trusted(self, session: Session) -> str | None:
        """The keyword of a trusted client address (also left in ``session.notes["trusted"]``)."""
        if "trusted" not in session.notes and self.backend is not None:
            await self._refresh()
            found = self.backend.trusted(session.peer_ip)
            if found:
                session.notes["trusted"] = found
                log.info("session=%s client=%s trusted without AUTH: %s", session.id, session.peer_ip,
                         _quoted(found))
        keyword: str | None = session.notes.get("trusted")
        return keyword

    async def _refresh(self) -> None:
        """Let the backend re-read a changed secrets file (at most every ``recheck`` seconds; one
        reading at a time, shared by every session that needs it)."""
        if self.backend is None:
            return
        loop = asyncio.get_running_loop()
        if self._refreshing is None:
            if loop.time() - self._checked < self.recheck:
                return
            self._checked = loop.time()
            self._refreshing = asyncio.ensure_future(asyncio.to_thread(self.backend.refresh))
            self._refreshing.add_done_callback(self._refreshed)
        try:
            await asyncio.shield(self._refreshing)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("auth: checking the secrets file failed; keeping the accounts read before")

    def _refreshed(self, future: asyncio.Future[None]) -> None:
        if self._refreshing is future:
            self._refreshing = None

    # ---------------------------------------------------------------- hooks
    @hookimpl
    async def on_connect(self, session: Session) -> Verdict | None:
        await self.trusted(session)
        return None

    @hookimpl
    async def on_mail_from(self, session: Session) -> Verdict | None:
        if not self.settings.require or session.auth_user or await self.trusted(session):
            return None
        log.info("session=%s client=%s MAIL refused: not authenticated and not a trusted address",
                 session.id, session.peer_ip)
        return AUTH_REQUIRED

    @hookimpl
    async def on_auth(self, session: Session, mechanism: str, username: str, password: str | None,
                      challenge: str | None, response: str | None) -> Verdict | None:
        if self.backend is None or self._executor is None:
            return None
        mechanism = mechanism.upper()
        if mechanism not in self.auth_mechanisms(session):
            return UNKNOWN_MECHANISM
        problem = _malformed(username, password, response)
        backend, executor = self.backend, self._executor

        async def check() -> Outcome:
            if problem:
                return Outcome(False, problem)
            await self._refresh()
            return await asyncio.get_running_loop().run_in_executor(
                executor, backend.check, mechanism, username, password, challenge, response)

        result = await throttled_login(
            self.throttle, session.peer_ip, username, check, failure_delay=self.settings.failure_delay,
            on_failure=lambda reason, failures: self._failed(session, mechanism, username, reason, failures),
            logger=log, context=f"session={session.id} auth")
        if result.login is Login.OK:
            log.info("session=%s client=%s authenticated user=%s mechanism=%s", session.id, session.peer_ip,
                     _quoted(username), mechanism)
            return AUTH_OK
        if result.login is Login.TEMPORARY:
            log.error("session=%s client=%s auth could not be checked user=%s mechanism=%s: %s", session.id,
                      session.peer_ip, _quoted(username), mechanism, result.reason)
            return AUTH_TEMPFAIL
        return AUTH_LOCKED if result.login is Login.LOCKED else AUTH_FAILED

    def _failed(self, session: Session, mechanism: str, username: str, reason: str, failures: int) -> None:
        log.warning("session=%s client=%s auth failed user=%s mechanism=%s reason=%s failures=%d "
                    "throttle_key=%s", session.id, session.peer_ip, _quoted(username), mechanism,
                    _quoted(reason), failures, client_key(session.peer_ip))
