"""The persistent outbox: one file per (webhook, event) in ``<spool>/webhooks/``.

``<hook>.<event-id>.json`` holds the exact body to POST. It is written to a ``.tmp`` name,
flushed and renamed into place by the spool's group committer (a worker thread, so many events
share a flush and the event loop never waits on the disk), and removed once the endpoint took it
or it was given up. A relay that restarts finds the files and sends them: nothing is lost, and
an event is sent again only if the relay stopped between the endpoint's answer and the removal
(receivers dedup by event id).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from pathlib import Path

from mailrelay.spool.committer import FILE_MODE, Discard, FileWrite, GroupCommitter, Job, SyncMethod, fsync_dir

log = logging.getLogger("mailrelay.webhooks")

DIRECTORY = "webhooks"
SUFFIX = ".json"
TMP = ".tmp"


def new_event_id() -> str:
    """A UUID version 7 (RFC 9562): unique, and time-ordered, so outbox names sort oldest first."""
    ms = time.time_ns() // 1_000_000 & (2**48 - 1)
    rand = int.from_bytes(os.urandom(10), "big")
    value = ms << 80 | 0x7 << 76 | (rand >> 68) << 64 | 0b10 << 62 | rand & (2**62 - 1)
    return str(uuid.UUID(int=value))


class Outbox:
    """Stores, lists, reads and removes outbox files; one per relay, shared by its webhooks."""

    def __init__(self, directory: Path, *, durable: bool, sync_method: SyncMethod):
        self.directory = directory
        self.durable = durable
        self._committer = GroupCommitter(str(directory), durable=durable, sync_method=sync_method)
        self._open = False

    def path(self, hook: str, event_id: str) -> Path:
        return self.directory / f"{hook}.{event_id}{SUFFIX}"

    async def open(self) -> dict[str, list[str]]:
        """Create the directory, start the writer; the events waiting, by hook, oldest first."""
        pending = await asyncio.to_thread(self._scan)
        self._committer.start()
        self._open = True
        return pending

    def _scan(self) -> dict[str, list[str]]:
        self.directory.mkdir(mode=0o770, parents=True, exist_ok=True)
        pending: dict[str, list[str]] = {}
        for name in sorted(os.listdir(self.directory)):
            if name.endswith(TMP):  # never flushed and renamed: never stored
                (self.directory / name).unlink(missing_ok=True)
                continue
            hook, dot, rest = name.partition(".")
            if dot and rest.endswith(SUFFIX):
                pending.setdefault(hook, []).append(rest[: -len(SUFFIX)])
        return pending

    async def store(self, event_id: str, hooks: list[str], body: bytes) -> None:
        """Write the event for each of ``hooks``; returns once the files are durable."""
        finals = [str(self.path(hook, event_id)) for hook in hooks]
        if not self._open:  # shutting down: observers still running get a plain synchronous write
            await asyncio.to_thread(self._store_now, finals, body)
            return
        job = Job(writes=[FileWrite(final + TMP, [body]) for final in finals],
                  renames=[(final + TMP, final) for final in finals])
        await self._committer.submit(job)

    def _store_now(self, finals: list[str], body: bytes) -> None:
        self.directory.mkdir(mode=0o770, parents=True, exist_ok=True)
        for final in finals:
            fd = os.open(final + TMP, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
            try:
                os.write(fd, body)
                if self.durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(final + TMP, final)
        if self.durable:
            fsync_dir(self.directory)

    async def read(self, hook: str, event_id: str) -> bytes | None:
        """The body to send; ``None`` if the file has gone (an operator removed it)."""
        try:
            return await asyncio.to_thread(self.path(hook, event_id).read_bytes)
        except FileNotFoundError:
            return None

    def remove(self, hook: str, event_id: str) -> None:
        """Drop the event's file (in the writer thread, after any write queued before)."""
        self._committer.discard(Discard([str(self.path(hook, event_id))]))

    async def close(self) -> None:
        """Finish queued writes and removals, then stop the writer thread."""
        if self._open:
            self._open = False
            await asyncio.to_thread(self._committer.stop)
