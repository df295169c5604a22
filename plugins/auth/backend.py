"""Checking credentials against an E-MailRelay secrets file (``--server-auth FILE``).

Which ``server`` line answers which mechanism:

* PLAIN and LOGIN: the user's ``plain`` password, else a ``bcrypt``/``argon2``/``scrypt`` hash,
  else an ``md5`` secret (the password's HMAC-MD5 state is computed and compared: our
  extension; E-MailRelay uses md5 secrets for CRAM-MD5 only);
* CRAM-MD5 (RFC 2195): the user's ``md5`` secret, else the ``plain`` password (E-MailRelay's
  order). Password hashes cannot answer a challenge.

An unknown user costs the same work as a known one: the password is checked against a decoy
secret of the type most accounts in the file use, with the same cost parameters. Comparisons are
constant-time. The file is read again when it changes (as E-MailRelay does); a file that no longer
parses is logged and the previous accounts stay in use.

Every method that reads files or hashes blocks: the plugin calls them in worker threads.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import hmac
import logging
import os
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from mailrelay.config.loader import ConfigError
from mailrelay.cram_md5 import cram_md5_digest, hashed_secret, parse_hashed_secret
from mailrelay.secrets import Secret, read_secrets

from . import hashes
from .trust import IPNetwork, TrustTable, parse_address_range

log = logging.getLogger("mailrelay.auth")

#: The secret types that can check a PLAIN/LOGIN password, in order of preference.
PASSWORD_KINDS = ("plain", *hashes.HASH_KINDS, "md5")
#: The secret types that can answer a CRAM-MD5 challenge, in order of preference.
CRAM_KINDS = ("md5", "plain")


@dataclass(frozen=True)
class Outcome:
    """The answer of a backend. ``reason`` is for the log only (never shown to the client)."""

    ok: bool
    reason: str = ""
    temporary: bool = False  # the backend could not decide (PAM down): 454, not 535


class Backend(Protocol):
    """What the plugin needs of a credentials store."""

    def mechanisms(self, secure: bool) -> list[str]:
        """The mechanisms this store can check, without TLS (``secure=False``) or under TLS."""

    def trusted(self, peer_ip: str) -> str | None:
        """The keyword of a trusted client address, or None."""

    def refresh(self) -> None:
        """Re-read configuration that changed (blocking)."""

    def check(self, mechanism: str, username: str, password: str | None, challenge: str | None,
              response: str | None) -> Outcome:
        """Check one set of credentials (blocking)."""


@dataclass(frozen=True)
class Accounts:
    """The ``server`` lines of one version of the secrets file."""

    by_name: dict[str, dict[str, Secret]] = field(default_factory=dict)
    trust: TrustTable = field(default_factory=TrustTable)
    decoy: Secret = field(default_factory=lambda: Secret("server", "plain", "", os.urandom(16).hex(), 0))
    cram_decoy: Secret = field(default_factory=lambda: Secret("server", "md5", "", hashed_secret(os.urandom(16).hex()), 0))

    @functools.cached_property
    def kinds(self) -> frozenset[str]:
        """The secret types of all accounts (asked on every EHLO: computed once)."""
        return frozenset(kind for secrets in self.by_name.values() for kind in secrets)

    def for_password(self, name: str) -> Secret | None:
        secrets = self.by_name.get(name, {})
        return next((secrets[k] for k in PASSWORD_KINDS if k in secrets), None)

    def for_cram(self, name: str) -> Secret | None:
        secrets = self.by_name.get(name, {})
        return next((secrets[k] for k in CRAM_KINDS if k in secrets), None)


def load_accounts(path: str | Path) -> Accounts:
    """Read and check the ``server`` lines of a secrets file; ConfigError names the file and line."""
    by_name: dict[str, dict[str, Secret]] = collections.defaultdict(dict)
    trusted: dict[IPNetwork, str] = {}
    for secret in read_secrets(path):
        if secret.side != "server":
            continue
        where = f"{path}:{secret.line}"
        if secret.kind == "none":
            try:
                network = parse_address_range(secret.name)
            except ValueError as e:
                raise ConfigError(f"{where}: trusted address {e}") from None
            if network in trusted:
                raise ConfigError(f"{where}: duplicate trusted address {secret.name!r}")
            trusted[network] = secret.secret
            continue
        try:
            if secret.kind in hashes.HASH_KINDS:
                hashes.check_format(secret.kind, secret.secret)
            elif secret.kind == "md5":
                parse_hashed_secret(secret.secret)
        except hashes.MissingLibrary as e:
            raise ConfigError(f"{where}: {e}") from None
        except ValueError as e:
            raise ConfigError(f"{where}: bad {secret.kind} secret: {e}") from None
        if secret.kind in by_name[secret.name]:
            raise ConfigError(f"{where}: duplicate server secret ({secret.kind}) for {secret.name!r}")
        by_name[secret.name][secret.kind] = secret
    accounts = Accounts(dict(by_name), TrustTable.build(list(trusted.items())))
    return replace(accounts, decoy=_password_decoy(accounts))


def _password_decoy(accounts: Accounts) -> Secret:
    """A secret like the one most accounts would be checked against for PLAIN/LOGIN."""
    primaries = [accounts.for_password(name) for name in accounts.by_name]
    counts = collections.Counter(s.kind for s in primaries if s is not None)
    if not counts:
        return Accounts().decoy
    kind = max(PASSWORD_KINDS, key=lambda k: counts[k])
    example = next(s for s in primaries if s is not None and s.kind == kind)
    random_password = os.urandom(16).hex()
    if kind == "plain":
        secret = random_password
    elif kind == "md5":
        secret = hashed_secret(random_password)
    else:
        secret = hashes.decoy_like(kind, example.secret)
    return Secret("server", kind, "", secret, 0)


def password_matches(secret: Secret, password: bytes) -> bool:
    """Whether ``password`` (UTF-8) is the one ``secret`` holds or hashes."""
    if secret.kind == "plain":
        # Comparing digests hides the stored password's length too.
        return hmac.compare_digest(hashlib.sha256(password).digest(),
                                   hashlib.sha256(secret.secret.encode("utf-8")).digest())
    if secret.kind == "md5":
        stored = b"".join(parse_hashed_secret(secret.secret))
        return hmac.compare_digest(b"".join(parse_hashed_secret(hashed_secret(password))), stored)
    return hashes.verify_hash(secret.kind, secret.secret, password)


def cram_digest_of(username: str, response: str) -> str:
    """The hex digest of a CRAM-MD5 answer: ``response`` may be the digest alone or the whole
    decoded ``NAME DIGEST`` line."""
    name, _, digest = response.strip().rpartition(" ")
    if name and name != username:
        return ""
    return digest.lower()


class SecretsFileBackend:
    """Accounts and trusted addresses from an E-MailRelay secrets file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._signature: tuple[object, ...] | None = None  # of the file the accounts come from
        self._failed: tuple[object, ...] | None = None     # of the last file that could not be used
        self.accounts = Accounts()
        self.refresh(initial=True)

    def refresh(self, initial: bool = False) -> None:
        """Read the file if it changed. At start-up errors raise ConfigError; later each bad
        version is logged once and the accounts read before stay in use."""
        with self._lock:
            try:
                st = os.stat(self.path)
            except OSError as e:
                self._unusable(initial, ("unreadable", e.errno), f"{self.path}: cannot read secrets file: {e.strerror}")
                return
            signature = (st.st_ino, st.st_size, st.st_mtime_ns)
            if signature in (self._signature, self._failed):
                return
            try:
                accounts = load_accounts(self.path)
            except ConfigError as e:
                self._unusable(initial, signature, str(e))
                return
            self._signature, self._failed, self.accounts = signature, None, accounts
            if not initial:
                log.info("auth: secrets file %s reloaded accounts=%d trusted_addresses=%d", self.path,
                         len(accounts.by_name), len(accounts.trust))

    def _unusable(self, initial: bool, signature: tuple[object, ...], message: str) -> None:
        if initial:
            raise ConfigError(message)
        if signature != self._failed:
            self._failed = signature
            log.error("auth: secrets file not reloaded, keeping the accounts read before: %s", message)

    def mechanisms(self, secure: bool) -> list[str]:
        kinds = self.accounts.kinds
        cram = bool(kinds & {"plain", "md5"})
        # Without TLS, md5 secrets offer CRAM-MD5 only, as in E-MailRelay: no password in clear.
        password = bool(kinds & {"plain", *hashes.HASH_KINDS}) or (secure and bool(kinds))
        offered = (["CRAM-MD5"] if cram else []) + (["PLAIN", "LOGIN"] if password else [])
        if secure and not offered:
            offered = ["PLAIN"]  # RFC 4954 4 / E-MailRelay: PLAIN is always an option under TLS
        return offered

    def trusted(self, peer_ip: str) -> str | None:
        return self.accounts.trust.keyword_for(peer_ip)

    def check(self, mechanism: str, username: str, password: str | None, challenge: str | None,
              response: str | None) -> Outcome:
        accounts = self.accounts
        if mechanism in ("PLAIN", "LOGIN"):
            if not password:
                return Outcome(False, "empty password")
            secret = accounts.for_password(username)
            if password_matches(secret or accounts.decoy, password.encode("utf-8")) and secret is not None:
                return Outcome(True)
            return Outcome(False, "unknown user" if secret is None else "wrong password")
        if mechanism == "CRAM-MD5":
            digest = cram_digest_of(username, response or "")
            secret = accounts.for_cram(username)
            expected = cram_md5_digest(secret or accounts.cram_decoy, (challenge or "").encode("utf-8"))
            if (hmac.compare_digest(expected.encode("ascii"), digest.encode("utf-8"))
                    and secret is not None and bool(challenge)):
                return Outcome(True)
            if secret is None:
                has_other = username in accounts.by_name
                return Outcome(False, "no plain or md5 secret for CRAM-MD5" if has_other else "unknown user")
            return Outcome(False, "wrong password")
        return Outcome(False, f"mechanism {mechanism} is not supported")
