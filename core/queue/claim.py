"""Claiming a spooled message for forwarding: ``<id>.envelope`` becomes ``<id>.envelope.busy``.

The rename is atomic, so two workers (or two processes sharing the spool) never send the same
message. The claimer also holds an ``flock`` on the busy file for as long as it works on it;
a ``.busy`` file nobody holds a lock on, renamed longer ago than ``STALE_AFTER``, was left by a
crashed process and is put back in the queue at start-up.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("mailrelay.queue")

STALE_AFTER = 2.0  # seconds since the rename (ctime): claim() locks microseconds after renaming


@dataclass
class Claim:
    """A message this process is forwarding; release it with :meth:`release` or :meth:`finish`."""

    message_id: str
    busy_path: Path
    ready_path: Path
    fd: int

    def release(self) -> None:
        """Put the message back in the queue (``.busy`` to ready)."""
        try:
            os.rename(self.busy_path, self.ready_path)
        finally:
            self._unlock()

    def mark_bad(self, bad_path: Path) -> None:
        try:
            os.rename(self.busy_path, bad_path)
        finally:
            self._unlock()

    def finish(self) -> None:
        """The message is gone (delivered or abandoned): just drop the lock."""
        self._unlock()

    def relock(self) -> None:
        """Lock ``.busy`` again if a filter replaced the file (a rename over it): the lock is
        what tells another process's start-up that this message is still being worked on."""
        fd = os.open(self.busy_path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        if self.fd >= 0 and os.fstat(fd).st_ino == os.fstat(self.fd).st_ino:
            os.close(fd)
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise
        self._unlock()
        self.fd = fd

    def _unlock(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing drops the flock
            self.fd = -1


def claim(directory: Path, message_id: str) -> Claim | None:
    """Claim a ready message, or ``None`` if another worker was first."""
    ready = directory / f"{message_id}.envelope"
    busy = directory / f"{message_id}.envelope.busy"
    try:
        os.rename(ready, busy)
    except FileNotFoundError:
        return None
    fd = os.open(busy, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return Claim(message_id, busy, ready, fd)


def recover_stale(directory: Path, now: float | None = None) -> list[str]:
    """Put back ``.busy`` messages whose claimer is gone; return their ids."""
    now = time.time() if now is None else now
    recovered = []
    for path in directory.glob("*.envelope.busy"):
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live process is forwarding it
            if now - os.fstat(fd).st_ctime < STALE_AFTER:
                continue  # just claimed; its claimer may not have locked it yet
            ready = path.with_name(path.name[: -len(".busy")])
            os.rename(path, ready)
            message_id = path.name[: -len(".envelope.busy")]
            recovered.append(message_id)
            log.warning("id=%s recovered from an interrupted forwarding attempt", message_id)
        finally:
            os.close(fd)
    return recovered
