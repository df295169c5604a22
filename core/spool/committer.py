"""Group commit: one worker thread turns many concurrent spool writes into few disk flushes.

Sessions hand in jobs and await a future. The worker takes everything queued, writes the files
(each envelope ending with its commit marker, see :mod:`.commit_marker`), flushes once for the
whole batch (``syncfs`` of the spool's file system, or ``fdatasync`` per file and an ``fsync`` of
the directory), renames the envelopes into place and resolves the futures. So a client never sees
250 before its message is on disk, and twenty sessions committing at once cost one flush, not
forty.

The renames themselves are made durable by the next batch's flush, or by an ``fsync`` of the
directory when no batch has come for ``RENAME_SYNC_DELAY``; until then a system crash can undo one,
which is what the marker is for: start-up publishes a settled ``.envelope.new`` whose marker
matches its files (:meth:`mailrelay.spool.store.Spool.sweep_orphans`). Waiting for that second flush before
answering would double every client's wait, for nothing the marker does not already give.
A job without a marker (the webhooks outbox) has no such repair: it is answered after an
``fsync`` of the directory.
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
import time
from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable, Literal, Sequence, Union

from .commit_marker import PublishState, checksum, marked
from .held_syscalls import HeldSyscalls, local_file_system

log = logging.getLogger("mailrelay.spool")

SyncMethod = Literal["syncfs", "fsync"]
FileCalls = Union[ModuleType, HeldSyscalls]  # os, or the same calls keeping the GIL
FILE_MODE = 0o660  # E-MailRelay's spool files are group read/write, so filters in the group can edit them
# Seconds the worker waits for another batch before it persists answered renames on its own: a
# flood's next batch comes sooner and carries them, so the flood pays no flush of its own for them.
RENAME_SYNC_DELAY = 0.05
# Writes and renames keep the GIL (held_syscalls.py) for batches of at most this many octets, and
# stop doing so for HELD_PAUSE seconds after a batch's took longer than HELD_SLOW: meanwhile the
# event loop waits for them.
HELD_BATCH_BYTES = 1 << 20
HELD_SLOW = 0.02
HELD_PAUSE = 60.0


@dataclass
class FileWrite:
    """Create ``path`` exclusively with ``parts`` as content (or overwrite when ``replace``)."""

    path: str
    parts: Sequence[bytes]
    replace: bool = False


@dataclass(frozen=True)
class Seal:
    """End ``envelope_path`` with the commit marker over it and ``content_path`` before the flush."""

    content_path: str
    envelope_path: str
    to: PublishState = "ready"


@dataclass
class Job:
    """Write some files, then (after the flush) rename some, then resolve ``future``."""

    writes: list[FileWrite] = field(default_factory=list)
    flush: list[str] = field(default_factory=list)      # already-written files to make durable
    renames: list[tuple[str, str]] = field(default_factory=list)
    seal: Seal | None = None
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

    def __init__(self, directory: str, *, durable: bool = True, sync_method: SyncMethod = "syncfs",
                 rename_sync_delay: float = RENAME_SYNC_DELAY, held_syscalls: bool = True):
        if sync_method == "syncfs" and _syncfs is None:
            sync_method = "fsync"
        self.directory = directory
        self.durable = durable
        self.sync_method: SyncMethod = sync_method
        self._queue: queue.SimpleQueue[Job | Discard | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._dir_fd = -1
        self.rename_sync_delay = rename_sync_delay
        self._renames_unsynced = False
        self._renamed_at = 0.0     # when the oldest rename not yet flushed was made
        self.batches = 0
        self.jobs = 0
        self.directory_syncs = 0   # fsyncs of the directory made only to persist earlier renames
        # On a local file system, small batches are written without handing the GIL back and forth.
        self._held = HeldSyscalls.load() if held_syscalls and local_file_system(directory) else None
        self._held_paused_until = 0.0
        self.held_batches = 0      # batches written that way

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
            timeout = None
            if self._renames_unsynced:  # a batch arriving soon carries them with its flush
                timeout = self._renamed_at + self.rename_sync_delay - time.monotonic()
                if timeout <= 0:
                    self._sync_renames()
                    timeout = None
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                self._sync_renames()
                continue
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
        if self._renames_unsynced:
            self._sync_renames()

    def _sync_renames(self) -> None:
        """Persist the renames of answered batches now that no batch is waiting to carry them."""
        self._renames_unsynced = False
        self.directory_syncs += 1
        try:
            os.fsync(self._dir_fd)
        except OSError as e:
            # Every message it concerns was acknowledged after its flush; if the renames are lost,
            # start-up publishes the marked .envelope.new files.
            log.error("spool: could not sync the directory after publishing messages: %s", e)

    def _process(self, batch: list[Job]) -> None:
        self.batches += 1
        self.jobs += len(batch)
        held = self._held_for(batch)
        calls: FileCalls = os if held is None else held
        started = time.monotonic()
        errors: dict[int, BaseException] = {}
        written: dict[int, list[str]] = {}
        for i, job in enumerate(batch):
            try:
                written[i] = []
                if job.seal is not None and self.durable:
                    _seal(job, job.seal)
                for w in job.writes:
                    _write_file(w, calls)
                    written[i].append(w.path)
            except OSError as e:
                errors[i] = e
        held_time = time.monotonic() - started
        ok = [i for i in range(len(batch)) if i not in errors]
        if self.durable and ok:
            try:
                self._flush([p for i in ok for p in (*written[i], *batch[i].flush)])
            except OSError as e:
                for i in ok:
                    errors[i] = e
                ok = []
        started = time.monotonic()
        renamed: dict[int, list[tuple[str, str]]] = {}
        for i in ok:
            renamed[i] = []
            try:
                for src, dst in batch[i].renames:
                    calls.rename(src, dst)
                    renamed[i].append((src, dst))
            except OSError as e:
                errors[i] = e
        if held is not None:
            self._held_took(held_time + time.monotonic() - started, len(batch))
        if self.durable and any(renamed.values()) and not self._renames_unsynced:
            self._renames_unsynced = True
            self._renamed_at = time.monotonic()
        # A job without a commit marker (the webhooks outbox) has nothing that could repair a
        # lost rename: its answer waits for an fsync of the directory, which a sealed job's need not.
        unsealed = [i for i, done in renamed.items()
                    if self.durable and done and batch[i].seal is None and i not in errors]
        self._finish(batch, [i for i in range(len(batch)) if i not in unsealed], errors, written, renamed)
        if unsealed:
            try:
                os.fsync(self._dir_fd)
                self._renames_unsynced = False
            except OSError as e:
                for i in unsealed:
                    errors[i] = e
            self._finish(batch, unsealed, errors, written, renamed)

    def _held_for(self, batch: list[Job]) -> HeldSyscalls | None:
        """The GIL-keeping calls for this batch, or None: os calls, which release the GIL."""
        if self._held is None or time.monotonic() < self._held_paused_until:
            return None
        if sum(len(p) for job in batch for w in job.writes for p in w.parts) > HELD_BATCH_BYTES:
            return None
        self.held_batches += 1
        return self._held

    def _held_took(self, seconds: float, jobs: int) -> None:
        if seconds > HELD_SLOW:
            self._held_paused_until = time.monotonic() + HELD_PAUSE
            log.warning("spool: writing %d message(s) took %.0f ms; for the next %.0f s spool writes let "
                        "the event loop run meanwhile", jobs, seconds * 1000, HELD_PAUSE)

    def _finish(self, batch: list[Job], which: list[int], errors: dict[int, BaseException],
                written: dict[int, list[str]], renamed: dict[int, list[tuple[str, str]]]) -> None:
        """Answer the jobs ``which`` of ``batch`` (indexes), taking back what a failed one did."""
        for i in which:
            if i in errors:
                # A client told to retry must not find its message queued as well (it would go
                # out twice), nor half of it left behind: take back what this job published and wrote.
                _undo(written.get(i, []), renamed.get(i, []))
        if which:
            self._complete([batch[i] for i in which], {n: errors[i] for n, i in enumerate(which) if i in errors})

    def _flush(self, paths: list[str]) -> None:
        """Make the files' data and names durable (and with them the previous batch's renames)."""
        if self.sync_method == "syncfs" and _syncfs is not None:
            if _syncfs(self._dir_fd) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"syncfs: {os.strerror(err)}")
            self._renames_unsynced = False
            return
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
        os.fsync(self._dir_fd)  # the names of files created since the last flush
        self._renames_unsynced = False

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


def _seal(job: Job, seal: Seal) -> None:
    """Put the commit marker on the job's envelope: into its write, or by rewriting the file."""
    content = next((w for w in job.writes if w.path == seal.content_path), None)
    envelope = next((w for w in job.writes if w.path == seal.envelope_path), None)
    if content is not None:
        size_crc = checksum(content.parts)
    else:  # written earlier (server filters may have edited it): checksum what is on disk
        with open(seal.content_path, "rb") as f:
            size_crc = checksum(iter(lambda: f.read(1 << 20), b""))
    if envelope is not None:
        envelope.parts = [marked(b"".join(envelope.parts), size_crc, seal.to)]
        return
    with open(seal.envelope_path, "rb") as f:
        data = marked(f.read(), size_crc, seal.to)
    job.writes.append(FileWrite(seal.envelope_path, [data], replace=True))
    if seal.envelope_path in job.flush:
        job.flush.remove(seal.envelope_path)


def _write_file(w: FileWrite, calls: FileCalls = os) -> None:
    """Create (or, when ``w.replace``, overwrite) ``w.path`` through ``calls``: the os module, or
    the GIL-keeping calls of the same names. A file not written whole is removed."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if w.replace else os.O_EXCL)
    fd = calls.open(w.path, flags | getattr(os, "O_CLOEXEC", 0), FILE_MODE)
    try:
        parts = [p for p in w.parts if p]
        total = sum(len(p) for p in parts)
        done = calls.writev(fd, parts) if parts else 0
        if done != total:  # a short write: finish it the slow way
            data = b"".join(parts)[done:]
            while data:
                n = calls.write(fd, data)
                data = data[n:]
    except OSError:
        calls.close(fd)
        _unlink_quietly(w.path)
        raise
    calls.close(fd)


def _undo(written: list[str], renamed: list[tuple[str, str]]) -> None:
    for src, dst in reversed(renamed):
        try:
            os.rename(dst, src)
        except OSError as e:
            log.warning("could not take back %s: %s", dst, e)
            _unlink_quietly(dst)
    for path in written:
        _unlink_quietly(path)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the entries of a directory (creations, renames, removals) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError as e:
        if e.errno != errno.ENOENT:
            log.warning("could not remove %s: %s", path, e)
