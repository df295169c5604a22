"""Who is asking: HTTP Basic and UI logins (the SMTP AUTH accounts), API tokens, UI sessions, CSRF.

Passwords are checked by the ``auth`` plugin's backends (an E-MailRelay secrets file, or PAM),
with its throttle: failures count per client address and per user name, then attempts are
delayed, then refused (429) until the failures age out. Every failure takes at least
``failure_delay``, so timing does not tell an unknown user from a wrong password.

Credentials (a password or a token) are accepted only over HTTPS or from loopback, so they never
cross a network in clear. A UI login gets a random session id in an HttpOnly, SameSite=Strict
cookie; the session lives in memory (a restart logs everybody out) and carries the CSRF token
that every form and every state-changing API call made with the cookie must echo.

Everything here blocks (hashing, PAM, file reads): it runs in the HTTP server's worker threads.
"""

from __future__ import annotations

import base64
import binascii
import collections
import functools
import hashlib
import hmac
import ipaddress
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from mailrelay_plugins.auth.backend import Backend
from mailrelay_plugins.auth.throttle import Throttle, ThrottlePolicy

from .tokens import TokenStore

log = logging.getLogger("mailrelay.admin")

MAX_USERNAME = 255
MAX_PASSWORD = 1024
MAX_SESSIONS = 1000
#: A program calling the API with Basic credentials is not made to pay for a password hash (or a
#: PAM conversation) on every request: a success is remembered this long (a changed or removed
#: account is noticed after at most this).
BASIC_CACHE_SECONDS = 60.0
BASIC_CACHE_SIZE = 256


class AuthProblem(Exception):
    """A request whose credentials are refused: ``status`` and JSON ``error``/``detail``."""

    def __init__(self, status: int, error: str, detail: str, retry_after: int | None = None) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail, self.retry_after = status, error, detail, retry_after


@dataclass
class UiSession:
    """A browser's login: the user, the CSRF token its forms carry, messages for the next page."""

    id: str
    user: str
    csrf: str
    expires: float
    flashes: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: ``via`` is ``basic``, ``token`` or ``session``."""

    user: str
    via: str
    session: UiSession | None = None


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return False


def secure_channel(environ: dict[str, Any]) -> bool:
    """HTTPS, or a client on loopback or a Unix socket (its password crosses no network)."""
    return (environ.get("wsgi.url_scheme") == "https" or is_loopback(environ.get("REMOTE_ADDR", ""))
            or bool(environ.get("mailrelay.local_socket")))


def same(a: str, b: str) -> bool:
    """Constant-time comparison of two secrets."""
    return hmac.compare_digest(a.encode("utf-8", "replace"), b.encode("utf-8", "replace"))


class Sessions:
    """UI sessions by id, in memory; the oldest goes when there are too many."""

    def __init__(self, lifetime: float) -> None:
        self.lifetime = lifetime
        self._lock = threading.Lock()
        self._sessions: collections.OrderedDict[str, UiSession] = collections.OrderedDict()

    def create(self, user: str) -> UiSession:
        session = UiSession(secrets.token_urlsafe(32), user, secrets.token_urlsafe(32), time.time() + self.lifetime)
        with self._lock:
            self._sessions[session.id] = session
            while len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)
        return session

    def get(self, session_id: str) -> UiSession | None:
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None and session.expires < time.time():
                del self._sessions[session_id]
                return None
            return session

    def end(self, session_id: str) -> None:
        with self._lock:
            self._sessions.pop(session_id, None)


class Authenticator:
    """Checks passwords and tokens; ``emit(name, **data)`` publishes ``auth.*`` events."""

    def __init__(self, backend: Backend | None, policy: ThrottlePolicy, failure_delay: float,
                 tokens: TokenStore, emit: Callable[..., None], source: str = "") -> None:
        self.backend = backend
        self.source = source  # for messages: the secrets file or "pam:..."
        self.failure_delay = failure_delay
        self.tokens = tokens
        self.emit = emit
        self.throttle = Throttle(policy)
        self._throttle_lock = threading.Lock()  # Throttle itself is not thread-safe
        self._refresh_lock = threading.Lock()
        self._refreshed = float("-inf")
        self._basic_lock = threading.Lock()
        self._basic_ok: collections.OrderedDict[bytes, float] = collections.OrderedDict()
        self._salt = secrets.token_bytes(16)

    def check_password(self, client_ip: str, username: str, password: str) -> bool:
        """True for the right password. Raises :class:`AuthProblem` when throttled (429) or when
        the backend cannot decide (503)."""
        if self.backend is None:
            raise AuthProblem(401, "unauthorized", "no password accounts are configured for the admin "
                              "server ([admin] auth or [auth] server_auth); use an API token")
        with self._throttle_lock:
            decision = self.throttle.attempt(client_ip, username)
        if decision.refuse:
            self._failed(client_ip, username, "too many failures: refused", decision.failures)
            raise AuthProblem(429, "too_many_failures", "too many failed logins; try again later",
                              retry_after=int(self.throttle.policy.window))
        if decision.delay:
            time.sleep(decision.delay)
        started = time.monotonic()
        if not username or len(username) > MAX_USERNAME or len(password) > MAX_PASSWORD or any(
                ord(c) < 32 or ord(c) == 127 for c in username) or "\0" in password or not password:
            ok, temporary, reason = False, False, "malformed user name or password"
        else:
            self._refresh()
            try:
                outcome = self.backend.check("PLAIN", username, password, None, None)
                ok, temporary, reason = outcome.ok, outcome.temporary, outcome.reason
            except Exception as e:  # a broken library: not the caller's fault
                log.exception("admin login check failed")
                ok, temporary, reason = False, True, f"{type(e).__name__}: {e}"
        if ok:
            with self._throttle_lock:
                self.throttle.succeeded(client_ip, username)
            log.info("admin: client=%s logged in user=%r", client_ip, username[:100])
            self.emit("auth.succeeded", client=client_ip, user=username, mechanism="HTTP", service="admin")
            return True
        if temporary:
            with self._throttle_lock:
                self.throttle.withdrawn(client_ip, username, decision)
            log.error("admin: client=%s login could not be checked user=%r: %s", client_ip, username[:100], reason)
            raise AuthProblem(503, "auth_unavailable", "the password could not be checked; try again later",
                              retry_after=30)
        self._failed(client_ip, username, reason, decision.failures + 1)
        remaining = self.failure_delay - (time.monotonic() - started)
        if remaining > 0:
            time.sleep(remaining)
        return False

    def check_token(self, token: str) -> str | None:
        """The token's name, or None."""
        return self.tokens.verify(token)

    def _failed(self, client_ip: str, username: str, reason: str, failures: int) -> None:
        log.warning("admin: client=%s login failed user=%r reason=%r failures=%d", client_ip, username[:100],
                    reason, failures)
        self.emit("auth.failed", client=client_ip, user=username[:255], mechanism="HTTP", service="admin",
                  reason=reason, failures=failures)

    def _refresh(self) -> None:
        """Let a secrets-file backend see an edited file (at most once a second)."""
        assert self.backend is not None
        with self._refresh_lock:
            if time.monotonic() - self._refreshed < 1.0:
                return
            self._refreshed = time.monotonic()
        try:
            self.backend.refresh()
        except Exception:
            log.exception("admin: re-reading the accounts failed; keeping those read before")

    # ---------------------------------------------------------------- requests
    def from_header(self, header: str, environ: dict[str, Any]) -> Principal:
        """The caller named by an ``Authorization`` header; :class:`AuthProblem` if refused."""
        scheme, _, value = header.strip().partition(" ")
        scheme = scheme.lower()
        if scheme not in ("basic", "bearer"):
            raise AuthProblem(401, "unauthorized", "use Basic (user and password) or Bearer (API token)")
        if not secure_channel(environ):
            raise AuthProblem(403, "insecure_channel", "credentials are accepted only over HTTPS or from "
                              "loopback; configure [admin] tls_certificate")
        if scheme == "bearer":
            name = self.check_token(value.strip())
            if name is None:
                self._failed(environ.get("REMOTE_ADDR", ""), "(token)", "unknown or revoked token", 0)
                raise AuthProblem(401, "unauthorized", "unknown or revoked token")
            return Principal(f"token:{name}", "token")
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise AuthProblem(401, "unauthorized", "malformed Basic credentials") from None
        username, sep, password = decoded.partition(":")
        if not sep:
            raise AuthProblem(401, "unauthorized", "malformed Basic credentials")
        # Keyed by a salted hash of the credentials: the cache never holds a password.
        key = hashlib.sha256(self._salt + decoded.encode("utf-8")).digest()
        now = time.monotonic()
        with self._basic_lock:
            checked = self._basic_ok.get(key)
        if checked is None or now - checked > BASIC_CACHE_SECONDS:
            if not self.check_password(environ.get("REMOTE_ADDR", ""), username, password):
                raise AuthProblem(401, "unauthorized", "wrong user name or password")
            with self._basic_lock:
                self._basic_ok[key] = now
                self._basic_ok.move_to_end(key)
                while len(self._basic_ok) > BASIC_CACHE_SIZE:
                    self._basic_ok.popitem(last=False)
        return Principal(username, "basic")


def emitter(loop: Any, relay: Any) -> Callable[..., None]:
    """``emit(name, **data)`` usable from any thread: the event is published in the relay's loop."""
    def emit(name: str, **data: Any) -> None:
        try:
            loop.call_soon_threadsafe(functools.partial(relay.emit, name, **data))
        except RuntimeError:  # the loop has closed: the relay is gone
            pass
    return emit
