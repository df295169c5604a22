"""Group commit: one worker thread turns many concurrent spool writes into few disk flushes.

Sessions hand in jobs and await a future. The worker takes everything queued, writes the files,
flushes once for the whole batch (``syncfs`` of the spool's filesystem, or ``fdatasync`` per file),
renames the envelopes into place, fsyncs the directory once, and only then resolves the futures.
So a client never sees 250 before its message and the rename that publishes it are on disk, and
twenty sessions committing at once cost two flushes, not forty.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import logging
import os
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

log = logging.getLogger("mailrelay.spool")

SyncMethod = Literal["syncfs", "fsync"]
FILE_MODE = 0o660  # E-MailRelay's spool files are group read/write, so filters in the group can edit them


@dataclass
class FileWrite:
    """Create ``path`` exclusively with ``parts`` as content (or overwrite when ``replace``)."""

    path: str
    parts: Sequence[bytes]
    replace: bool = False


@dataclass
class Job:
    """Write some files, then (after the flush) rename some, then resolve ``future``."""

    writes: list[FileWrite] = field(default_factory=list)
    flush: list[str] = field(default_factory=list)      # already-written files to make durable
    renames: list[tuple[str, str]] = field(default_factory=list)
    future: asyncio.Future[None] | None = None
    loop: asyncio.AbstractEventLoop | None = None


@dataclass
class Discard:
    """Unlink some files, then call ``then`` (in the commit thread). Nobody waits for it."""

    paths: list[str]
    then: Callable[[], None] | None = None


def _load_syncfs():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_syncfs = _load_syncfs()


def syncfs_available() -> bool:
    return _syncfs is not None


class GroupCommitter:
    """The worker thread; ``durable=False`` skips every flush (the ``durability = "none"`` setting)."""

    def __init__(self, directory: str, *, durable: bool = True, sync_method: SyncMethod = "syncfs"):
        if sync_method == "syncfs" and _syncfs is None:
            sync_method = "fsync"
        self.directory = directory
        self.durable = durable
        self.sync_method: SyncMethod = sync_method
        self._queue: queue.SimpleQueue[Job | Discard | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._dir_fd = -1
        self.batches = 0
        self.jobs = 0

    def start(self) -> None:
        self._dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        self._thread = threading.Thread(target=self._run, name="spool-commit", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Finish every queued job, then stop the thread."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1

    def submit(self, job: Job) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        job.loop = loop
        job.future = loop.create_future()
        if self._thread is None:
            job.future.set_exception(RuntimeError("spool is closed"))
        else:
            self._queue.put(job)
        return job.future

    def discard(self, item: Discard) -> None:
        """Queue files for removal off the event loop (delivered messages); done in order with
        the commits, and before :meth:`stop` returns."""
        if self._thread is None:
            _discard(item)
        else:
            self._queue.put(item)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch: list[Job] = []
            discards: list[Discard] = []
            item = self._queue.get()
            while True:
                if item is None:
                    stopping = True
                elif isinstance(item, Discard):
                    discards.append(item)
                else:
                    batch.append(item)
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._process(batch)
            for discard in discards:
                _discard(discard)

    def _process(self, batch: list[Job]) -> None:
        self.batches += 1
        self.jobs += len(batch)
        errors: dict[int, BaseException] = {}
        written: dict[int, list[str]] = {}
        for i, job in enumerate(batch):
            try:
                written[i] = []
                for w in job.writes:
                    _write_file(w)
                    written[i].append(w.path)
            except OSError as e:
                errors[i] = e
        ok = [i for i in range(len(batch)) if i not in errors]
        if self.durable and ok:
            try:
                self._flush([p for i in ok for p in (*written[i], *batch[i].flush)])
            except OSError as e:
                for i in ok:
                    errors[i] = e
                ok = []
        renamed: dict[int, list[tuple[str, str]]] = {}
        for i in ok:
            renamed[i] = []
            try:
                for src, dst in batch[i].renames:
                    os.rename(src, dst)
                    renamed[i].append((src, dst))
            except OSError as e:
                errors[i] = e
        if self.durable and any(renamed.values()):
            try:
                os.fsync(self._dir_fd)
            except OSError as e:
                # The renames may not survive a crash: nobody gets an acknowledgement.
                for i in range(len(batch)):
                    errors.setdefault(i, e)
        for i in errors:
            # A client told to retry must not find its message queued as well (it would go out
            # twice), nor half of it left behind: take back what this job published and wrote.
            _undo(written.get(i, []), renamed.get(i, []))
        self._complete(batch, errors)

    def _flush(self, paths: list[str]) -> None:
        if self.sync_method == "syncfs" and _syncfs is not None:
            if _syncfs(self._dir_fd) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"syncfs: {os.strerror(err)}")
            return
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)

    @staticmethod
    def _complete(batch: list[Job], errors: dict[int, BaseException]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, BaseException | None]]] = {}
        for i, job in enumerate(batch):
            assert job.loop is not None
            by_loop.setdefault(job.loop, []).append((job, errors.get(i)))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, items)
            except RuntimeError:  # the loop has closed; nobody is waiting any more
                log.warning("spool commit finished after its event loop closed")


def _discard(item: Discard) -> None:
    for path in item.paths:
        _unlink_quietly(path)
    if item.then is not None:
        try:
            item.then()
        except OSError as e:
            log.warning("after removing %s: %s", item.paths[0] if item.paths else "?", e)


def _resolve(items: list[tuple[Job, BaseException | None]]) -> None:
    for job, error in items:
        fut = job.future
        if fut is None or fut.done():
            continue
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)


def _write_file(w: FileWrite) -> None:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if w.replace else os.O_EXCL)
    fd = os.open(w.path, flags | getattr(os, "O_CLOEXEC", 0), FILE_MODE)
    try:
        parts = [p for p in w.parts if p]
        total = sum(len(p) for p in parts)
        done = os.writev(fd, parts) if parts else 0
        if done != total:  # a short write: finish it the slow way
            data = b"".join(parts)[done:]
            while data:
                n = os.write(fd, data)
                data = data[n:]
    except OSError:
        os.close(fd)
        _unlink_quietly(w.path)
        raise
    os.close(fd)


def _undo(written: list[str], renamed: list[tuple[str, str]]) -> None:
    for src, dst in reversed(renamed):
        try:
            os.rename(dst, src)
        except OSError as e:
            log.warning("could not take back %s: %s", dst, e)
            _unlink_quietly(dst)
    for path in written:
        _unlink_quietly(path)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError as e:
        if e.errno != errno.ENOENT:
            log.warning("could not remove %s: %s", path, e)
