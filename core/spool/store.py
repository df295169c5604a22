"""The spool directory: E-MailRelay's message store, made durable with group commit.

``<id>.content`` holds the message; ``<id>.envelope`` its envelope, whose suffix is the state:
``.new`` (being written or filtered: never forwarded), none (ready), ``.busy`` (being forwarded),
``.bad`` (failed, ``Reason:`` inside). Ids are ``emailrelay.<pid>.<unix-time>.<seq>`` like
E-MailRelay's, so its tools and ours can share one spool.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal

from . import commit_marker
from .committer import (FILE_MODE, Discard, FileWrite, GroupCommitter, Job, Seal, SyncMethod, _unlink_quietly,
                        fsync_dir)
from .envelope import Envelope

log = logging.getLogger("mailrelay.spool")

State = Literal["new", "ready", "busy", "bad"]
_SUFFIX: dict[State, str] = {"new": ".envelope.new", "ready": ".envelope", "busy": ".envelope.busy",
                             "bad": ".envelope.bad"}
# Anything that names a file in the spool must match this: no path separators, no dot-dot.
_ID_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,200}")
_SEQUENCE = itertools.count(1)
ORPHAN_AGE = 600.0  # seconds before a leftover .new or content-only file is swept at start-up


class SpoolError(OSError):
    """The spool could not store a message; ``disk_full`` selects 452 over 451 for the client."""

    def __init__(self, message: str, *, disk_full: bool = False):
        super().__init__(message)
        self.disk_full = disk_full


@dataclass(frozen=True)
class PendingMessage:
    """A message whose files are written but not yet published (``.envelope.new``)."""

    id: str
    content_path: Path
    envelope_path: Path


def is_valid_id(text: str) -> bool:
    """True when ``text`` can only name a file inside the spool (API and CLI input check)."""
    return bool(_ID_RE.fullmatch(text)) and ".." not in text


class Spool:
    """Writes, commits and lists messages in one spool directory."""

    def __init__(self, directory: str | os.PathLike[str], *, durable: bool = True,
                 sync_method: SyncMethod = "syncfs"):
        self.directory = Path(directory)
        self.durable = durable
        self._committer = GroupCommitter(str(self.directory), durable=durable, sync_method=sync_method)
        self._pid = os.getpid()

    @property
    def sync_method(self) -> str:
        return self._committer.sync_method if self.durable else "none"

    # ---------------------------------------------------------------- lifecycle
    def open(self) -> None:
        """Create the directory if needed, check it is writable, start the commit worker."""
        try:
            self.directory.mkdir(mode=0o770, parents=True, exist_ok=True)
        except OSError as e:
            raise SpoolError(f"cannot create spool directory {self.directory}: {e.strerror}") from None
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise SpoolError(f"spool directory {self.directory} is not writable")
        self._pid = os.getpid()  # after a daemon fork the pid has changed
        self._committer.start()

    def close(self) -> None:
        """Finish queued commits and stop the worker."""
        self._committer.stop()

    def sweep_orphans(self, older_than: float = ORPHAN_AGE) -> int:
        """Tidy what a crash left behind; the number of leftovers removed.

        A ``.envelope.new`` whose commit marker matches its envelope was committed: the client
        may have its 250, and a system crash may have taken the rename after the flush. Once it
        predates the system's start or is older than ``older_than`` seconds (so no live process
        is still committing it), it is published into the state the marker names if its content
        matches too, else set aside as ``.envelope.bad`` with the reason: never deleted. Every
        other ``.envelope.new``, and content without an envelope, was never acknowledged and is
        removed once older than ``older_than`` seconds, so another process sharing the spool
        keeps its in-flight messages.
        """
        cutoff = time.time() - older_than
        booted = system_boot_time()
        removed = repaired = 0
        names = set(os.listdir(self.directory))
        for name in sorted(names):
            path = self.directory / name
            stem = None
            if name.endswith(".envelope.new"):
                stem = name[: -len(".envelope.new")]
            elif name.endswith(".content") and not any(
                    name[: -len(".content")] + s in names for s in _SUFFIX.values()) and \
                    not self._referenced_from_mailbox(name[: -len(".content")]):
                stem = name[: -len(".content")]
            if stem is None:
                continue
            try:
                mtime = path.stat().st_mtime
            except FileNotFoundError:
                continue
            settled = mtime <= cutoff or (booted is not None and mtime < booted)
            if name.endswith(".envelope.new") and settled and self._repair_committed(stem):
                repaired += 1
                continue
            if mtime > cutoff:
                continue
            _unlink_quietly(str(path))
            if name.endswith(".envelope.new"):
                _unlink_quietly(str(self.directory / (stem + ".content")))
            removed += 1
            log.warning("spool: removed unacknowledged leftover %s", name)
        if repaired:
            fsync_dir(self.directory)
        return removed

    def _repair_committed(self, stem: str) -> bool:
        """Publish, or set aside as bad, ``<stem>.envelope.new`` if it carries a commit marker
        that matches it; False when it has none (never committed), True when it has one (if the
        repair fails, the file stays for an operator)."""
        if not is_valid_id(stem):
            return False
        new = self.envelope_path(stem, "new")
        try:
            raw = new.read_bytes()
        except OSError:
            return False
        marker = commit_marker.read_marker(raw)
        if marker is None:
            return False
        content = self.content_path(stem)
        try:
            if commit_marker.content_matches(marker, content):
                target = self.envelope_path(stem, marker.to)
                os.rename(new, target)
                log.warning("spool: published %s: committed before a crash, which took its rename", target.name)
                return True
            size = content.stat().st_size if content.exists() else 0
            reason = (f"content incomplete after a crash ({size} of {marker.size} octets): its commit did "
                      "not finish, so its client was not told 250")
            bad = Envelope.from_bytes(commit_marker.unmarked(raw), source=str(new)).with_reason(reason)
            _write_new_file(self.envelope_path(stem, "bad"), bad.to_bytes())
            _unlink_quietly(str(new))
            log.warning("spool: set aside %s.envelope.bad: %s", stem, reason)
            return True
        except (OSError, ValueError) as e:
            # Kept as it is, never removed: an operator can look at it.
            log.error("spool: could not repair %s, committed before a crash: %s", new.name, e)
            return True

    def _referenced_from_mailbox(self, message_id: str) -> bool:
        """E-MailRelay's ``copy:pop`` leaves the content here and the envelope in a mailbox
        sub-directory (``--pop-by-name``): such content is not an orphan."""
        try:
            subdirs = [e for e in os.scandir(self.directory) if e.is_dir() and not e.name.startswith(".")]
        except OSError:
            return True  # when in doubt, keep it
        return any(os.path.exists(os.path.join(d.path, message_id + suffix))
                   for d in subdirs for suffix in (".envelope", ".envelope.busy", ".envelope.new"))

    # ---------------------------------------------------------------- writing
    def new_id(self) -> str:
        # The sequence is per process, not per Spool: two relays in one process (tests, embedders)
        # must not hand out the same id in the same second.
        return f"emailrelay.{self._pid}.{int(time.time())}.{next(_SEQUENCE)}"

    def content_path(self, message_id: str) -> Path:
        return self.directory / f"{message_id}.content"

    def envelope_path(self, message_id: str, state: State = "ready") -> Path:
        return self.directory / f"{message_id}{_SUFFIX[state]}"

    async def write(self, message_id: str, envelope: Envelope, content_parts: list[bytes], *,
                    commit: bool) -> PendingMessage:
        """Write content and ``.envelope.new``; with ``commit`` also publish, durably, in one job.

        Without ``commit`` the files are written but not flushed, so server filters can read and
        edit them; :meth:`commit` or :meth:`abort` follows. ``message_id`` comes from
        :meth:`new_id` (the Received: header names it before the files exist).
        """
        if not is_valid_id(message_id):
            raise SpoolError(f"invalid spool id {message_id!r}")
        pending = self._pending(message_id)
        job = Job(writes=[FileWrite(str(pending.content_path), content_parts),
                          FileWrite(str(pending.envelope_path), [envelope.to_bytes()])])
        if commit:
            job.renames.append((str(pending.envelope_path), str(self.envelope_path(message_id))))
            job.seal = Seal(str(pending.content_path), str(pending.envelope_path))
        try:
            await self._committer.submit(job)
        except OSError as e:
            raise _spool_error("write", e) from None
        return pending

    async def commit(self, pending: PendingMessage, *, new_content: bytes | None = None,
                     envelope: Envelope | None = None, state: State = "ready") -> None:
        """Make a written message durable and publish it (``state`` ``bad`` for quarantine)."""
        if state not in ("ready", "bad"):
            raise ValueError(f"a commit publishes into ready or bad, not {state}")
        job = Job(renames=[(str(pending.envelope_path), str(self.envelope_path(pending.id, state)))],
                  seal=Seal(str(pending.content_path), str(pending.envelope_path), state))
        if new_content is not None:
            job.writes.append(FileWrite(str(pending.content_path), [new_content], replace=True))
        else:
            job.flush.append(str(pending.content_path))
        if envelope is not None:
            job.writes.append(FileWrite(str(pending.envelope_path), [envelope.to_bytes()], replace=True))
        else:
            job.flush.append(str(pending.envelope_path))
        try:
            await self._committer.submit(job)
        except OSError as e:
            raise _spool_error("commit", e) from None

    def abort(self, pending: PendingMessage) -> None:
        """Forget a written-but-unpublished message (rejected, abandoned or failed)."""
        _unlink_quietly(str(pending.envelope_path))
        _unlink_quietly(str(pending.content_path))

    def discard(self, paths: list[Path], then: Callable[[], None] | None = None) -> None:
        """Remove files of a finished message in the commit thread, then call ``then`` there.

        For delivered messages: nothing waits for the unlinks, which on a journalling file
        system cost the event loop as much as the rest of a delivery.
        """
        self._committer.discard(Discard([str(p) for p in paths], then))

    def _pending(self, message_id: str) -> PendingMessage:
        return PendingMessage(message_id, self.content_path(message_id),
                              self.envelope_path(message_id, "new"))

    # ---------------------------------------------------------------- reading
    def ids(self, state: State = "ready") -> list[str]:
        """Message ids in ``state``, oldest name first (E-MailRelay's sorted order)."""
        suffix = _SUFFIX[state]
        out = []
        for name in os.listdir(self.directory):
            if name.endswith(suffix):
                stem = name[: -len(suffix)]
                # ".envelope" is a suffix of nothing else we write, but ".envelope.bad" ends
                # differently, so a plain suffix test is exact for every state.
                if is_valid_id(stem):
                    out.append(stem)
        return sorted(out)

    def read_envelope(self, message_id: str, state: State = "ready") -> Envelope:
        if not is_valid_id(message_id):
            raise FileNotFoundError(message_id)
        path = self.envelope_path(message_id, state)
        return Envelope.from_bytes(path.read_bytes(), source=str(path))

    def read_content(self, message_id: str) -> bytes:
        if not is_valid_id(message_id):
            raise FileNotFoundError(message_id)
        return self.content_path(message_id).read_bytes()

    def iter_ready(self) -> Iterator[tuple[str, Envelope]]:
        for message_id in self.ids("ready"):
            try:
                yield message_id, self.read_envelope(message_id)
            except (OSError, ValueError) as e:
                log.warning("spool: skipping %s: %s", message_id, e)


def _write_new_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), FILE_MODE)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def system_boot_time() -> float | None:
    """When the running system started (seconds since the epoch), or None where unknown.

    Files written before it belong to no running process: what the spool's sweep may repair.
    """
    try:
        with open("/proc/stat", "rb") as f:
            for line in f:
                if line.startswith(b"btime "):
                    return float(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _spool_error(what: str, e: OSError) -> SpoolError:
    disk_full = e.errno in (errno.ENOSPC, errno.EDQUOT)
    log.error("spool %s failed: %s", what, e)
    return SpoolError(f"spool {what} failed: {e.strerror or e}", disk_full=disk_full)
