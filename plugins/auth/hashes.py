"""Password hashes for ``server bcrypt|argon2|scrypt NAME HASH`` lines (our extension).

The formats are the usual ones, so hashes made by other tools can be pasted in:

* ``bcrypt``: ``$2b$12$...`` (also ``$2a$``/``$2y$``), via the ``bcrypt`` package (PyCA);
* ``argon2``: the PHC string ``$argon2id$v=19$m=65536,t=3,p=4$SALT$HASH`` (also argon2i/argon2d),
  via ``argon2-cffi``;
* ``scrypt``: passlib's ``$scrypt$ln=16,r=8,p=1$SALT$HASH`` (base64 without padding), computed
  with the standard library's ``hashlib.scrypt``.

Hashing is deliberately slow: every function here blocks, and the plugin runs them in its worker
threads, never on the event loop.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from dataclasses import dataclass, replace
from typing import Any

from mailrelay.secrets import SERVER_HASH_KINDS

__all__ = ["HASH_KINDS", "HashFormatError", "MissingLibrary", "check_format", "make_hash", "verify_hash",
           "decoy_like"]

HASH_KINDS = SERVER_HASH_KINDS  # ("bcrypt", "argon2", "scrypt"): what core/secrets.py accepts

BCRYPT_ROUNDS = 12                 # about 0.25 s per check on a 2020s core
SCRYPT_LN, SCRYPT_R, SCRYPT_P = 16, 8, 1   # 64 MiB per check, as passlib's default
SCRYPT_MAX_MEMORY = 1 << 30        # refuse parameters that need more than 1 GiB per check
SCRYPT_SALT_BYTES, SCRYPT_KEY_BYTES = 16, 32
BCRYPT_MAX_PASSWORD = 72           # bcrypt only ever sees the first 72 bytes

_BCRYPT = re.compile(r"\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}")
_SCRYPT = re.compile(r"\$scrypt\$ln=(\d{1,2}),r=(\d{1,3}),p=(\d{1,3})\$([A-Za-z0-9+/.]*)\$([A-Za-z0-9+/.]+)")


class HashFormatError(ValueError):
    """A secrets-file hash is not in the format its type names."""


class MissingLibrary(RuntimeError):
    """The library a hash type needs is not installed."""


def _bcrypt() -> Any:
    try:
        import bcrypt
    except ImportError:
        raise MissingLibrary("bcrypt hashes need the 'bcrypt' package (pip install bcrypt)") from None
    return bcrypt


def _argon2() -> Any:
    try:
        import argon2
    except ImportError:
        raise MissingLibrary("argon2 hashes need the 'argon2-cffi' package (pip install argon2-cffi)") from None
    return argon2


@dataclass(frozen=True)
class _Scrypt:
    ln: int
    r: int
    p: int
    salt: bytes
    key: bytes

    @property
    def memory(self) -> int:
        """What OpenSSL allocates: the V array (N+2 blocks of 128*r bytes) plus p blocks."""
        return 128 * self.r * ((1 << self.ln) + 2 + self.p)

    def derive(self, password: bytes) -> bytes:
        return hashlib.scrypt(password, salt=self.salt, n=1 << self.ln, r=self.r, p=self.p,
                              maxmem=self.memory + (1 << 20), dklen=len(self.key))

    def text(self) -> str:
        return f"$scrypt$ln={self.ln},r={self.r},p={self.p}${_b64(self.salt)}${_b64(self.key)}"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    # passlib writes standard base64 without padding; its "adapted" variant uses '.' for '+'.
    text = text.replace(".", "+")
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _parse_scrypt(text: str) -> _Scrypt:
    m = _SCRYPT.fullmatch(text)
    if not m:
        raise HashFormatError("expected passlib's form $scrypt$ln=N,r=R,p=P$SALT$HASH")
    try:
        parsed = _Scrypt(int(m[1]), int(m[2]), int(m[3]), _unb64(m[4]), _unb64(m[5]))
    except binascii.Error:
        raise HashFormatError("the salt and hash of an scrypt hash are base64") from None
    if not 1 <= parsed.ln <= 30 or parsed.r < 1 or parsed.p < 1 or len(parsed.key) < 16:
        raise HashFormatError("scrypt parameters out of range (ln 1-30, r and p at least 1, a hash of "
                              "at least 16 bytes)")
    if parsed.memory > SCRYPT_MAX_MEMORY:
        raise HashFormatError(f"scrypt parameters need {parsed.memory >> 20} MiB per check (at most "
                              f"{SCRYPT_MAX_MEMORY >> 20} MiB)")
    return parsed


def check_format(kind: str, text: str) -> None:
    """Raise HashFormatError (or MissingLibrary) unless ``text`` is a usable ``kind`` hash."""
    if kind == "bcrypt":
        m = _BCRYPT.fullmatch(text)
        if not m or not 4 <= int(m[1]) <= 31:
            raise HashFormatError("expected a bcrypt hash like $2b$12$ followed by 53 characters")
        _bcrypt()
    elif kind == "argon2":
        argon2 = _argon2()
        try:
            argon2.extract_parameters(text)
        except argon2.exceptions.InvalidHashError:
            raise HashFormatError("expected an argon2 PHC string like $argon2id$v=19$m=65536,t=3,p=4$...") from None
    elif kind == "scrypt":
        _parse_scrypt(text)
    else:
        raise HashFormatError(f"unknown hash type {kind!r} (known: {', '.join(HASH_KINDS)})")


def make_hash(kind: str, password: bytes) -> str:
    """A new salted hash of ``password`` with this module's default cost."""
    if not password:
        raise ValueError("the password is empty")
    if kind == "bcrypt":
        if len(password) > BCRYPT_MAX_PASSWORD:
            raise ValueError(f"bcrypt can only use passwords of up to {BCRYPT_MAX_PASSWORD} bytes; "
                             "use argon2 or scrypt for longer ones")
        bcrypt = _bcrypt()
        return str(bcrypt.hashpw(password, bcrypt.gensalt(BCRYPT_ROUNDS)).decode("ascii"))
    if kind == "argon2":
        return str(_argon2().PasswordHasher().hash(password))
    if kind == "scrypt":
        template = _Scrypt(SCRYPT_LN, SCRYPT_R, SCRYPT_P, os.urandom(SCRYPT_SALT_BYTES), bytes(SCRYPT_KEY_BYTES))
        return replace(template, key=template.derive(password)).text()
    raise ValueError(f"unknown hash type {kind!r} (known: {', '.join(HASH_KINDS)})")


def verify_hash(kind: str, text: str, password: bytes) -> bool:
    """Whether ``password`` matches the ``kind`` hash ``text`` (a malformed hash never matches)."""
    if kind == "bcrypt":
        bcrypt = _bcrypt()
        if len(password) > BCRYPT_MAX_PASSWORD:
            return False  # bcrypt >= 5 refuses them rather than silently truncating
        try:
            return bool(bcrypt.checkpw(password, text.encode("ascii")))
        except ValueError:
            return False
    if kind == "argon2":
        argon2 = _argon2()
        try:
            return bool(argon2.PasswordHasher().verify(text, password))
        except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
            return False
    if kind == "scrypt":
        try:
            parsed = _parse_scrypt(text)
        except HashFormatError:
            return False
        return hmac.compare_digest(parsed.derive(password), parsed.key)
    return False


def decoy_like(kind: str, text: str) -> str:
    """A hash of a random password with the same type and cost as ``text``: checking an unknown
    user against it takes as long as checking a real one."""
    secret = os.urandom(16).hex().encode("ascii")
    if kind == "bcrypt":
        bcrypt = _bcrypt()
        rounds = int(text[4:6])
        return str(bcrypt.hashpw(secret, bcrypt.gensalt(rounds)).decode("ascii"))
    if kind == "argon2":
        argon2 = _argon2()
        return str(argon2.PasswordHasher.from_parameters(argon2.extract_parameters(text)).hash(secret))
    if kind == "scrypt":
        template = replace(_parse_scrypt(text), salt=os.urandom(SCRYPT_SALT_BYTES))
        return replace(template, key=template.derive(secret)).text()
    raise ValueError(f"unknown hash type {kind!r}")
