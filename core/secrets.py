"""E-MailRelay's secrets file: the accounts for ``--client-auth`` and ``--server-auth``.

Each non-comment line has four fields: ``client|server TYPE NAME SECRET``. TYPE ``plain``
takes NAME and SECRET in RFC 3461 xtext (``my+20secret``), ``plain:b`` in base64, ``md5`` a
hashed secret from ``emailrelay-passwd`` (CRAM-MD5); ``server none ADDRESS KEYWORD`` marks
trusted client addresses. Our extension for ``server`` lines: ``bcrypt``, ``argon2`` and
``scrypt`` take a password hash (``relay passwd --type ...``) as SECRET, so no password needs to
be on disk; the ``auth`` plugin checks their format. Errors name the file and line.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .config.loader import ConfigError, read_text_file
from .spool.envelope import xtext_decode


@dataclass(frozen=True)
class Secret:
    side: Literal["client", "server"]
    kind: str           # "plain", "md5", "none", or (server) one of SERVER_HASH_KINDS
    name: str           # the account name (decoded), or an address range for "none"
    secret: str         # the password (decoded), a hash, or a keyword for "none"
    line: int
    selector: str = ""  # client lines: E-MailRelay's fifth field, matched with ClientAccountSelector

    @property
    def authenticates(self) -> bool:
        """False for E-MailRelay's "no authentication" client account (``client plain:b = = sel``)."""
        return bool(self.name or self.secret)


#: Password-hash types accepted on ``server`` lines (not E-MailRelay's: ours).
SERVER_HASH_KINDS = ("bcrypt", "argon2", "scrypt")


def read_secrets(path: str | Path) -> list[Secret]:
    """Every ``client`` and ``server`` line of the secrets file at ``path``, names and plain
    secrets decoded; raises ConfigError naming the file and line."""
    path = Path(path)
    text = read_text_file(path, "secrets file")
    secrets = []
    for lineno, raw in enumerate(text.split("\n"), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) < 4:
            raise ConfigError(f"{path}:{lineno}: expected 'client|server TYPE NAME SECRET'")
        side, kind, name, secret = fields[0].lower(), fields[1].lower(), fields[2], fields[3]
        if side not in ("client", "server"):
            raise ConfigError(f"{path}:{lineno}: the first field must be 'client' or 'server', not {fields[0]!r}")
        if kind in ("plain", "login"):
            name, secret = xtext_decode(name), xtext_decode(secret)
            kind = "plain"
        elif kind == "plain:b":
            try:
                # "=" is E-MailRelay's empty field (no authentication for that selector).
                name = "" if name == "=" else base64.b64decode(name, validate=True).decode("utf-8")
                secret = "" if secret == "=" else base64.b64decode(secret, validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                raise ConfigError(f"{path}:{lineno}: plain:b fields must be base64 of UTF-8 text") from None
            kind = "plain"
        elif kind in ("md5", "cram-md5", "apop") or (kind == "none" and side == "server"):
            if kind != "none":  # E-MailRelay's aliases for a hashed (emailrelay-passwd) secret
                name, kind = xtext_decode(name), "md5"
        elif kind in SERVER_HASH_KINDS and side == "server":
            name = xtext_decode(name)
        else:
            raise ConfigError(f"{path}:{lineno}: unknown secret type {fields[1]!r} (plain, plain:b, md5"
                              f"{', none, bcrypt, argon2, scrypt' if side == 'server' else ''})")
        selector = fields[4] if side == "client" and len(fields) > 4 and not fields[4].startswith("#") else ""
        secrets.append(Secret(side, kind, name, secret, lineno, selector))  # type: ignore[arg-type]
    return secrets


def client_accounts(path: str | Path) -> dict[str, Secret]:
    """The ``client`` lines by account selector (``""``: the line without one, used when a
    message's envelope names no ``ClientAccountSelector``); the first line for a selector wins."""
    accounts: dict[str, Secret] = {}
    for secret in read_secrets(path):
        if secret.side == "client" and secret.selector not in accounts:
            if secret.kind == "md5":
                _check_md5(path, secret)
            accounts[secret.selector] = secret
    if not accounts:
        raise ConfigError(f"{path}: no 'client' line (e.g. 'client plain alice my+20secret')")
    return accounts


def _check_md5(path: str | Path, secret: Secret) -> None:
    from .cram_md5 import parse_hashed_secret
    try:
        parse_hashed_secret(secret.secret)
    except ValueError as e:
        raise ConfigError(f"{path}:{secret.line}: bad md5 secret: {e}") from None


def client_account(path: str | Path) -> Secret:
    """The account used when a message names no selector: the first ``client`` line without one
    (else the first ``client`` line). Plain secrets do PLAIN, LOGIN or CRAM-MD5; md5 ones (the
    hashed form ``emailrelay-passwd`` prints) CRAM-MD5 only."""
    accounts = client_accounts(path)
    return accounts.get("") or next(iter(accounts.values()))


def parse_auth_config(text: str, option: str, known: tuple[str, ...], foreign: tuple[str, ...] = (),
                      example: str = "m:cram-md5,plain") -> dict[str, tuple[str, ...]]:
    """E-MailRelay's ``--server-auth-config`` / ``--client-auth-config`` value (case-insensitive):
    ``;``-separated items ``m:`` (allow or prefer), ``x:`` (exclude), ``a:`` and ``d:`` (the same
    once under TLS), each a comma-separated mechanism list; the first item of each kind counts, as
    in E-MailRelay. Mechanisms named in ``foreign`` are accepted (other software's) but never used.
    Returns ``{"M": (...), ...}``; a ``ConfigError`` names the bad item."""
    items: dict[str, tuple[str, ...]] = {}
    for item in (part.strip() for part in text.upper().split(";")):
        if not item:
            continue
        key, colon, names = item.partition(":")
        if not colon or key not in ("M", "X", "A", "D"):
            raise ConfigError(f"{option}: {item.lower()!r} is not m:, x:, a: or d: followed by "
                              f"mechanism names (e.g. {example})")
        mechanisms = tuple(n.strip() for n in names.split(",") if n.strip())
        for name in mechanisms:
            if name not in known and name not in foreign:
                raise ConfigError(f"{option}: unknown mechanism {name.lower()!r} "
                                  f"(known: {', '.join(m.lower() for m in known)})")
        items.setdefault(key, mechanisms)
    return items
