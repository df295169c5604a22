"""A POP3 session's view of one mailbox: lock, message list, and the deletions of the UPDATE state.

Two layouts are served, the two that ``deliver:`` and ``copy:`` write:

* a maildir (``tmp/``, ``new/``, ``cur/``: :mod:`.maildir`);
* E-MailRelay's layout, ``<id>.envelope`` + ``<id>.content`` (the spool itself, or a mailbox
  that ``copy:`` filled; with ``copy:pop`` the content stays in the spool: :mod:`.spooldir`).

Opening a mailbox takes an exclusive ``flock`` on ``<mailbox>/.pop3.lock``, so a second session,
from this process or another one, is told the mailbox is in use (RFC 2449 ``[IN-USE]``). The
list of messages is taken once, at login: what arrives later appears in the next session. Only
names and sizes are kept; contents are read when retrieved.

Deletions happen only at QUIT, all or none: the names to delete are written to
``<mailbox>/.pop3-expunge`` and flushed before the first file goes; should the process die half
way, whoever opens the mailbox next finishes the job before listing anything. A session that
ends any other way (dropped connection, time-out, shutdown) changes nothing.

Everything here blocks (file system calls): the server runs it in worker threads.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from mailrelay.spool import fsync_dir

from .wire import wire_size

log = logging.getLogger("mailrelay.pop3")

LOCK_NAME = ".pop3.lock"
JOURNAL_NAME = ".pop3-expunge"
_UID_RE = re.compile(r"[\x21-\x7e]{1,70}")  # RFC 1939 7: unique-id characters, at most 70


class MailboxInUse(Exception):
    """Another session holds the mailbox."""


@dataclass(slots=True)
class StoredMessage:
    """One message of a session's list (message number = index + 1)."""

    uid: str            # UIDL: the same in every session
    size: int           # octets RETR sends before byte-stuffing
    name: str           # where it is: "new/<file>" / "cur/<file>" (maildir), the spool id (E-MailRelay layout)
    deleted: bool = False
    retrieved: bool = False


@dataclass
class CommitResult:
    deleted: int = 0
    failed: list[str] = field(default_factory=list)  # names that could not be removed


def uid_for(unique: str) -> str:
    """A UIDL value from a stable name: the name itself when RFC 1939 allows it, else a hash."""
    if _UID_RE.fullmatch(unique):
        return unique
    return "H" + hashlib.sha256(os.fsencode(unique)).hexdigest()[:40]


class SizeCache:
    """Wire sizes by file identity, so a message is read for its size once per process, not
    once per session. Bounded; least recently used entries go first. Thread-safe."""

    def __init__(self, limit: int = 200_000):
        self.limit = limit
        self._sizes: collections.OrderedDict[tuple[int, int, int, int], int] = collections.OrderedDict()
        self._lock = threading.Lock()

    def size_of(self, path: Path, st: os.stat_result) -> int:
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            found = self._sizes.get(key)
            if found is not None:
                self._sizes.move_to_end(key)
                return found
        size = wire_size(path)
        with self._lock:
            self._sizes[key] = size
            while len(self._sizes) > self.limit:
                self._sizes.popitem(last=False)
        return size

    def __len__(self) -> int:
        return len(self._sizes)


class Mailbox:
    """The common part of both layouts: locking, the expunge journal, and the message list."""

    def __init__(self, directory: Path, *, durable: bool, sizes: SizeCache):
        self.directory = directory
        self.durable = durable
        self.sizes = sizes
        self.messages: list[StoredMessage] = []
        self._lock_fd = -1

    # ---------------------------------------------------------------- life cycle
    def open(self) -> "Mailbox":
        """Lock, finish an interrupted expunge, list the messages. Raises :class:`MailboxInUse`."""
        if not self.directory.is_dir():  # nothing delivered yet: an empty mailbox, nothing to lock
            return self
        self._lock()
        try:
            self._roll_forward()
            self.messages = self.scan()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Release the lock (closing the descriptor drops the flock)."""
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def _lock(self) -> None:
        path = self.directory / LOCK_NAME
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(path, flags, 0o660)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise MailboxInUse(str(self.directory)) from None
            raise
        self._lock_fd = fd

    # ---------------------------------------------------------------- what the layouts provide
    def scan(self) -> list[StoredMessage]:
        """The messages now in the mailbox, oldest first."""
        raise NotImplementedError

    def content_path(self, message: StoredMessage) -> Path:
        """Where the message's content is now (it may have moved since the scan);
        FileNotFoundError if it is gone."""
        raise NotImplementedError

    def remove(self, name: str) -> bool:
        """Remove one message by its stored name; False if it could not be (busy, say). A
        message already gone counts as removed."""
        raise NotImplementedError

    def mark_seen(self, messages: list[StoredMessage]) -> None:
        """Retrieved messages that stay: record that they were read (maildir's ``S`` flag)."""

    def directories(self) -> Iterable[Path]:
        """The directories whose entries removals change (flushed after an expunge)."""
        return [self.directory]

    # ---------------------------------------------------------------- UPDATE state
    def commit(self, *, delete: bool) -> CommitResult:
        """RFC 1939 UPDATE: remove the messages marked deleted (unless ``delete`` is False, as
        with ``--pop-no-delete``), mark retrieved ones seen. Call with the lock held."""
        doomed = [m.name for m in self.messages if m.deleted] if delete else []
        self.mark_seen([m for m in self.messages if m.retrieved and not (m.deleted and delete)])
        if not doomed:
            return CommitResult()
        self._write_journal(doomed)
        result = self._expunge(doomed)
        return result

    def _write_journal(self, names: list[str]) -> None:
        path = self.directory / JOURNAL_NAME
        tmp = path.with_name(JOURNAL_NAME + ".tmp")
        data = json.dumps({"delete": names}).encode("utf-8", "surrogateescape")
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(tmp, flags, 0o660)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if self.durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        if self.durable:
            fsync_dir(self.directory)

    def _expunge(self, names: list[str]) -> CommitResult:
        result = CommitResult()
        for name in names:
            try:
                if self.remove(name):
                    result.deleted += 1
                else:
                    result.failed.append(name)
            except OSError as e:
                log.error("pop3: mailbox %s: cannot remove %s: %s", self.directory, name, e)
                result.failed.append(name)
        if self.durable:
            for directory in self.directories():
                fsync_dir(directory)
        os.unlink(self.directory / JOURNAL_NAME)
        if self.durable:
            fsync_dir(self.directory)
        return result

    def _roll_forward(self) -> None:
        """An expunge was interrupted (crash, power loss): finish it before anything is listed."""
        path = self.directory / JOURNAL_NAME
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return
        try:
            names = json.loads(raw.decode("utf-8", "surrogateescape"))["delete"]
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ValueError("not a list of names")
        except (ValueError, KeyError, TypeError) as e:
            log.error("pop3: mailbox %s: unreadable %s (%s); removed, nothing deleted", self.directory,
                      JOURNAL_NAME, e)
            os.unlink(path)
            return
        result = self._expunge(names)
        log.warning("pop3: mailbox %s: finished an interrupted expunge: %d removed", self.directory,
                    result.deleted)
