"""The greylisting state: one SQLite row per triplet, used from a single worker thread.

SQLite connections belong to the thread that made them, and every query may touch the disk, so
all of it runs in one dedicated thread; the event loop only awaits the answers.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")
Triplet = tuple[str, str, str]  # client network, sender, recipient
PURGE_EVERY = 3600.0             # seconds between removals of forgotten triplets

_SCHEMA = """
CREATE TABLE IF NOT EXISTS triplets (
    network TEXT NOT NULL,
    sender TEXT NOT NULL,
    recipient TEXT NOT NULL,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    passed INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (network, sender, recipient)
)
"""


@dataclass(frozen=True)
class Decision:
    passed: bool
    retry_in: float = 0.0   # seconds until a retry would pass (when not passed)


class TripletStore:
    """Triplets in ``path`` (created if missing)."""

    def __init__(self, path: Path):
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="greylist")
        self._db: sqlite3.Connection | None = None
        self._last_purge = 0.0

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def open(self) -> None:
        def connect() -> None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=10)
            db.execute("PRAGMA journal_mode=WAL")    # readers never wait for the writer
            db.execute("PRAGMA synchronous=NORMAL")  # losing the last triplets in a crash is harmless
            db.execute(_SCHEMA)
            db.commit()
            self._db = db
        await self._run(connect)

    async def close(self) -> None:
        def disconnect() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None
        await self._run(disconnect)
        self._executor.shutdown(wait=True)

    async def check(self, triplet: Triplet, *, delay: float, expire: float, lifetime: float) -> Decision:
        """Record an attempt for ``triplet`` and say whether it may pass now."""
        return await self._run(lambda: self._check(triplet, delay, expire, lifetime, time.time()))

    def _check(self, triplet: Triplet, delay: float, expire: float, lifetime: float, now: float) -> Decision:
        db = self._db
        assert db is not None, "TripletStore.open() was not awaited"
        with db:  # one transaction: read, decide, write
            row = db.execute("SELECT first_seen, last_seen, passed FROM triplets "
                             "WHERE network = ? AND sender = ? AND recipient = ?", triplet).fetchone()
            if row is not None:
                first_seen, last_seen, passed = row
                forgotten = now - last_seen > lifetime if passed else now - first_seen > expire
                if not forgotten:
                    passes = bool(passed) or now - first_seen >= delay
                    db.execute("UPDATE triplets SET last_seen = ?, passed = ? "
                               "WHERE network = ? AND sender = ? AND recipient = ?", (now, int(passes), *triplet))
                    return Decision(True) if passes else Decision(False, delay - (now - first_seen))
            db.execute("INSERT OR REPLACE INTO triplets (network, sender, recipient, first_seen, last_seen, passed) "
                       "VALUES (?, ?, ?, ?, ?, 0)", (*triplet, now, now))
            if now - self._last_purge > PURGE_EVERY:
                self._last_purge = now
                db.execute("DELETE FROM triplets WHERE (passed = 0 AND first_seen < ?) OR "
                           "(passed = 1 AND last_seen < ?)", (now - expire, now - lifetime))
        return Decision(False, delay)
