"""API tokens: ``relay token create NAME`` / ``list`` / ``revoke NAME``.

A token is 256 random bits (``mrt_`` + URL-safe base64), shown once when created. The file keeps
only its SHA-256: a token has too much entropy to be guessed from its hash, so a slow password
hash would add nothing. The file is JSON, mode 0600, replaced atomically (written beside it,
flushed, renamed, directory flushed) under a lock, so the daemon never reads half a file; the
daemon re-reads it when it changes, so a revoked token stops working at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

PREFIX = "mrt_"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class TokenError(Exception):
    """A token operation that cannot be done; the message says why."""


@dataclass(frozen=True)
class TokenRecord:
    name: str
    sha256: str
    created: float
    hint: str  # the first characters, so an operator can tell tokens apart

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "sha256": self.sha256, "created": self.created, "hint": self.hint}


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class TokenStore:
    """The tokens file: read (and re-read when it changes) by the daemon, edited by the CLI."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._signature: tuple[int, int, int] | None = None
        self._by_digest: dict[str, TokenRecord] = {}

    # ---------------------------------------------------------------- reading
    def records(self) -> list[TokenRecord]:
        """Every token, in the order created; a missing file is no tokens."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as e:
            raise TokenError(f"{self.path}: cannot read the tokens file: {e}") from None
        try:
            return [TokenRecord(str(t["name"]), str(t["sha256"]), float(t["created"]), str(t.get("hint", "")))
                    for t in data["tokens"]]
        except (KeyError, TypeError, ValueError):
            raise TokenError(f"{self.path}: not a tokens file (expected {{\"tokens\": [...]}})") from None

    def verify(self, token: str) -> str | None:
        """The name of the token, or None. Blocking (a ``stat`` per call): call it off the loop."""
        if not token.startswith(PREFIX) or len(token) > 200:
            return None
        self._refresh()
        record = self._by_digest.get(digest(token))
        return record.name if record else None

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
            signature: tuple[int, int, int] | None = (st.st_ino, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            signature = None
        with self._lock:
            if signature == self._signature:
                return
            try:
                records = self.records() if signature is not None else []
            except TokenError:
                records = []  # an unreadable file lets nobody in (never keep revoked tokens)
            self._by_digest = {r.sha256: r for r in records}
            self._signature = signature

    # ---------------------------------------------------------------- changing (the CLI)
    def create(self, name: str) -> str:
        """Add a token named ``name`` and return it (the only time it is ever seen)."""
        if not _NAME.fullmatch(name):
            raise TokenError(f"{name!r}: a token name is 1-64 letters, digits, '.', '_' or '-'")
        token = PREFIX + secrets.token_urlsafe(32)
        with self._locked():
            records = self.records()
            if any(r.name == name for r in records):
                raise TokenError(f"a token named {name!r} exists already (revoke it first)")
            records.append(TokenRecord(name, digest(token), time.time(), token[:8]))
            self._write(records)
        return token

    def revoke(self, name: str) -> None:
        with self._locked():
            records = self.records()
            kept = [r for r in records if r.name != name]
            if len(kept) == len(records):
                raise TokenError(f"no token named {name!r} in {self.path}")
            self._write(kept)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One editor at a time (two `relay token create` at once must not lose one)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _write(self, records: list[TokenRecord]) -> None:
        data = json.dumps({"tokens": [r.to_dict() for r in records]}, indent=2).encode() + b"\n"
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask, and even if tmp existed
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
