"""CRAM-MD5 (RFC 2195) answers from plain passwords and from E-MailRelay's hashed ``md5`` secrets.

An ``md5`` secret, as printed by ``emailrelay-passwd``, is the HMAC-MD5 (RFC 2104) key with the
password-independent half of the work already done: the MD5 chaining values (A, B, C, D) after
one 64-byte block of ``key XOR ipad`` (the inner state), then after one block of ``key XOR opad``
(the outer state). Each value is four little-endian bytes, so each state is 16 bytes, laid out
like an MD5 digest; the 32 bytes, inner first, are written in base64 with padding. Older
secrets use a "dotted" form instead: the same 32 bytes as eight decimal little-endian 32-bit
numbers joined by dots. Answering a challenge means continuing MD5 from those saved states,
which ``hashlib`` cannot do, hence the small ``Md5State`` here.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
import struct
from typing import Protocol

__all__ = ["Md5State", "SecretLike", "hashed_secret", "parse_hashed_secret",
           "cram_md5_digest", "cram_md5_response"]

BLOCK_SIZE = 64
INITIAL_STATE = (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476)

_MASK = 0xFFFFFFFF
_SINES = [int(abs(math.sin(i + 1)) * 2**32) & _MASK for i in range(64)]
_SHIFTS = [7, 12, 17, 22] * 4 + [5, 9, 14, 20] * 4 + [4, 11, 16, 23] * 4 + [6, 10, 15, 21] * 4


def _rotate_left(x: int, n: int) -> int:
    return ((x << n) | (x >> (32 - n))) & _MASK


class Md5State:
    """MD5 (RFC 1321) that can start from saved chaining values instead of the standard ones.

    ``Md5State()`` behaves like ``hashlib.md5()``. ``Md5State.from_bytes(saved)`` resumes from a
    16-byte state after ``length`` bytes (a multiple of 64) have already been hashed, so
    ``update`` and ``digest`` give what one hash over the earlier bytes plus the new ones would.
    """

    def __init__(self, state: tuple[int, int, int, int] = INITIAL_STATE, length: int = 0) -> None:
        if length < 0 or length % BLOCK_SIZE:
            raise ValueError(f"an MD5 state can only be saved on a block boundary, not after {length} bytes")
        self._state = state
        self._length = length
        self._pending = b""

    @classmethod
    def from_bytes(cls, saved: bytes, length: int = BLOCK_SIZE) -> Md5State:
        """Resume from a 16-byte state (A, B, C, D little-endian, as ``state_bytes`` returns)."""
        if len(saved) != 16:
            raise ValueError(f"an MD5 state is 16 bytes, not {len(saved)}")
        a, b, c, d = struct.unpack("<4I", saved)
        return cls((a, b, c, d), length)

    def state_bytes(self) -> bytes:
        """The chaining values as 16 bytes; only meaningful after whole 64-byte blocks."""
        if self._pending:
            raise ValueError("the MD5 state is between blocks; add a multiple of 64 bytes first")
        return struct.pack("<4I", *self._state)

    def update(self, data: bytes) -> None:
        """Hash more bytes."""
        self._length += len(data)
        buffered = self._pending + data
        whole = len(buffered) - len(buffered) % BLOCK_SIZE
        for offset in range(0, whole, BLOCK_SIZE):
            self._state = _compress(self._state, buffered[offset:offset + BLOCK_SIZE])
        self._pending = buffered[whole:]

    def digest(self) -> bytes:
        """The 16-byte MD5 value of everything hashed so far (the object stays usable)."""
        tail = self._pending + b"\x80"
        tail += b"\x00" * ((56 - len(tail)) % BLOCK_SIZE)
        tail += struct.pack("<Q", (self._length * 8) & 0xFFFFFFFFFFFFFFFF)
        state = self._state
        for offset in range(0, len(tail), BLOCK_SIZE):
            state = _compress(state, tail[offset:offset + BLOCK_SIZE])
        return struct.pack("<4I", *state)

    def hexdigest(self) -> str:
        """``digest()`` in lowercase hex."""
        return self.digest().hex()


def _compress(state: tuple[int, int, int, int], block: bytes) -> tuple[int, int, int, int]:
    words = struct.unpack("<16I", block)
    a, b, c, d = state
    for i in range(64):
        if i < 16:
            f, g = (b & c) | (~b & d), i
        elif i < 32:
            f, g = (d & b) | (~d & c), (5 * i + 1) % 16
        elif i < 48:
            f, g = b ^ c ^ d, (3 * i + 5) % 16
        else:
            f, g = c ^ (b | (~d & _MASK)), (7 * i) % 16
        f = (f + a + _SINES[i] + words[g]) & _MASK
        a, d, c, b = d, c, b, (b + _rotate_left(f, _SHIFTS[i])) & _MASK
    return ((state[0] + a) & _MASK, (state[1] + b) & _MASK,
            (state[2] + c) & _MASK, (state[3] + d) & _MASK)


class SecretLike(Protocol):
    """What the CRAM-MD5 functions need of a ``mailrelay.secrets.Secret``."""

    @property
    def kind(self) -> str: ...      # "plain" (the password) or "md5" (a hashed secret)

    @property
    def secret(self) -> str: ...


def _hmac_key_pads(password: bytes) -> tuple[bytes, bytes]:
    key = hashlib.md5(password).digest() if len(password) > BLOCK_SIZE else password
    key = key.ljust(BLOCK_SIZE, b"\x00")
    return bytes(k ^ 0x36 for k in key), bytes(k ^ 0x5C for k in key)


def hashed_secret(password: str | bytes, *, dotted: bool = False) -> str:
    """What ``emailrelay-passwd`` prints for ``password`` (text is hashed as UTF-8, bytes as
    they are, like ``emailrelay-passwd --base64``): the ``md5`` secrets-file field.

    ``dotted=True`` gives the older form that ``emailrelay-passwd --dotted`` prints.
    """
    if not password:
        raise ValueError("the password is empty")
    inner, outer = Md5State(), Md5State()
    key = password.encode("utf-8") if isinstance(password, str) else password
    inner_pad, outer_pad = _hmac_key_pads(key)
    inner.update(inner_pad)
    outer.update(outer_pad)
    raw = inner.state_bytes() + outer.state_bytes()
    if dotted:
        return ".".join(str(n) for n in struct.unpack("<8I", raw))
    return base64.b64encode(raw).decode("ascii")


def parse_hashed_secret(text: str) -> tuple[bytes, bytes]:
    """The (inner, outer) 16-byte MD5 states of an ``md5`` secret, base64 or dotted.

    Raises ValueError if ``text`` is neither form of a 32-byte state pair.
    """
    parts = text.split(".")
    if len(parts) == 8 and all(part.isdigit() and part.isascii() for part in parts):
        numbers = [int(part) for part in parts]
        if any(n > _MASK for n in numbers):
            raise ValueError("a dotted md5 secret holds eight 32-bit numbers")
        raw = struct.pack("<8I", *numbers)
    else:
        try:
            raw = base64.b64decode(text, validate=True)
        except binascii.Error:
            raise ValueError("an md5 secret is base64 (or dotted decimal) from emailrelay-passwd") from None
        if len(raw) != 32:
            raise ValueError(f"an md5 secret holds 32 bytes, not {len(raw)}")
    return raw[:16], raw[16:]


def cram_md5_digest(secret: SecretLike, challenge: bytes) -> str:
    """The lowercase hex HMAC-MD5 of ``challenge`` (decoded from the server's 334 line).

    A ``plain`` secret is the password (UTF-8); an ``md5`` secret is ``emailrelay-passwd``
    output. Both give the same digest for the same password. Raises ValueError for an md5
    secret that does not parse, or for any other kind.
    """
    if secret.kind == "plain":
        return hmac.new(secret.secret.encode("utf-8"), challenge, "md5").hexdigest()
    if secret.kind == "md5":
        inner_state, outer_state = parse_hashed_secret(secret.secret)
        inner = Md5State.from_bytes(inner_state)
        inner.update(challenge)
        outer = Md5State.from_bytes(outer_state)
        outer.update(inner.digest())
        return outer.hexdigest()
    raise ValueError(f"a {secret.kind!r} secret cannot answer CRAM-MD5 (plain or md5 only)")


def cram_md5_response(name: str, secret: SecretLike, challenge: bytes) -> str:
    """The base64 line answering ``AUTH CRAM-MD5``'s challenge: ``name``, a space, the hex digest."""
    answer = f"{name} {cram_md5_digest(secret, challenge)}"
    return base64.b64encode(answer.encode("utf-8")).decode("ascii")
