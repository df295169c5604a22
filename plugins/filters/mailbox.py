"""``filter-mailbox``: E-MailRelay's ``copy:`` and ``deliver:`` built-ins, durable.

* ``copy:`` puts a copy of the message into every sub-directory of the delivery directory
  (``--delivery-dir``, default the spool) except ``postmaster``, names starting with a dot and
  ``archive:`` directories (those holding an ``index.jsonl``), then removes the original and
  answers *abandon*, so nothing is forwarded. Options, ``;``-separated: ``nodelete`` keeps the
  original (answer *ok*), ``hardlink`` links the content instead of copying it, ``pop`` copies
  only the envelope and leaves the content in the spool for ``--pop-by-name`` (client stage only:
  at the server stage the unacknowledged content is discarded with the message).
* ``deliver:`` puts the message into the mailbox ``<delivery-dir>/<mailbox>/`` of each local
  recipient (``To-Local``, marked by an address verifier). A message with only local recipients
  is then removed (*abandon*); a mixed one keeps only its remote recipients. Options:
  ``hardlink``, ``nodelete`` (keep the message and its envelope as they are); ``pop`` is
  accepted and, as in E-MailRelay, changes nothing.

A directory with ``tmp``, ``new`` and ``cur`` is a maildir: the content goes into ``tmp/`` under a
unique maildir name and is renamed into ``new/``. Other directories get E-MailRelay's layout,
``<id>.content`` and ``<id>.envelope``. ``deliver:`` creates a missing mailbox as a maildir.
Every file and directory entry is on disk before the filter answers, so a message the client saw
acknowledged is never lost. Mailbox names that could leave the delivery directory are refused
with a temporary failure. The file work runs in a thread, not on the event loop.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from mailrelay_sdk import Envelope, FilterResult, Message, hookimpl

from mailrelay.filtering import FilterSpec, FilterSpecError
from mailrelay.spool import fsync_dir

log = logging.getLogger("mailrelay.filters")

FILE_MODE = 0o660   # as the spool's files: group members (a POP server, an IMAP server) read them
DIR_MODE = 0o770
TEMPFAIL = "Temporary local problem, please try again later"
ARCHIVE_MARKER = "index.jsonl"  # an archive: directory; copy: leaves it alone
_sequence = itertools.count()


# ---------------------------------------------------------------- durable file primitives
def write_file(path: Path, data: bytes, durable: bool, mode: int = FILE_MODE, *, exclusive: bool = False) -> None:
    """Write ``data`` to ``path`` (created with ``mode``; with ``exclusive`` it must not exist),
    flushed to disk when ``durable``."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: Path, data: bytes, *, durable: bool) -> None:
    """Replace ``path`` atomically: write a temporary file beside it, flush, rename over it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{next(_sequence)}.tmp")
    try:
        write_file(tmp, data, durable)
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise
    if durable:
        fsync_dir(path.parent)


def rewrite_envelope(message: Message, envelope: Envelope, *, durable: bool) -> None:
    """Write ``envelope`` over the message's envelope file (``.new`` or ``.busy``), atomically."""
    assert message.envelope_path is not None
    replace_file(message.envelope_path, envelope.to_bytes(), durable=durable)


def remove_message(message: Message, *, keep_content: bool = False, durable: bool) -> None:
    """Remove a message's spool files (the filter has taken it); the envelope goes first."""
    for path in (message.envelope_path, None if keep_content else message.content_path):
        if path is not None:
            _unlink(path)
    if durable and message.envelope_path is not None:
        fsync_dir(message.envelope_path.parent)


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------- mailboxes
def mailbox_problem(name: str) -> str | None:
    """Why ``name`` cannot be a mailbox directory under the delivery dir, or ``None`` if it can.

    A mailbox name comes from an address verifier and ends up as a path component: nothing that
    could name the parent, another directory, a hidden file or an unprintable file is allowed.
    """
    if not name:
        return "empty mailbox name"
    if name.startswith("."):
        return "mailbox name starts with a dot"
    if "/" in name or "\\" in name:
        return "mailbox name contains a path separator"
    if "\x00" in name:
        return "mailbox name contains NUL"
    if ".." in name:
        return "mailbox name contains '..'"
    if not name.isprintable():
        return "mailbox name contains unprintable characters"
    if len(os.fsencode(name)) > 255:
        return "mailbox name is too long"
    return None


def is_maildir(directory: Path) -> bool:
    return all((directory / sub).is_dir() for sub in ("tmp", "new", "cur"))


def maildir_name() -> str:
    """A unique maildir file name: time, microseconds, pid, counter, randomness, host."""
    now = time.time()
    host = (socket.gethostname() or "localhost").replace("/", "\\057").replace(":", "\\072")
    return (f"{int(now)}.M{int(now % 1 * 1_000_000)}P{os.getpid()}Q{next(_sequence)}"
            f"R{secrets.token_hex(4)}.{host}")


def _make_maildir(directory: Path, durable: bool) -> None:
    created = False
    try:
        os.mkdir(directory, DIR_MODE)
        created = True
    except FileExistsError:
        pass
    for sub in ("tmp", "new", "cur"):
        try:
            os.mkdir(directory / sub, DIR_MODE)
            created = True
        except FileExistsError:  # another worker made it at the same moment
            pass
    if created and durable:
        fsync_dir(directory)
        fsync_dir(directory.parent)


def _place_content(source: Path, target: Path, content: bytes, hardlink: bool, durable: bool) -> None:
    """``target`` gets the content: a hard link to ``source`` where asked and possible, else a copy."""
    if hardlink:
        try:
            os.link(source, target)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
        else:
            if durable:
                _fsync_file(target)  # at the server stage the spool file is not flushed yet
            return
    write_file(target, content, durable)


def deliver_to(directory: Path, message: Message, envelope_bytes: bytes, *, hardlink: bool = False,
               pop: bool = False, durable: bool = True) -> str:
    """Put one copy of ``message`` into ``directory``; return the name it was stored under.

    Maildir: content into ``tmp/``, renamed into ``new/``. Otherwise E-MailRelay's layout:
    ``<id>.content`` (not with ``pop``) then ``<id>.envelope``, each published by a rename.
    """
    assert message.content_path is not None
    if is_maildir(directory):
        name = maildir_name()
        tmp, new = directory / "tmp" / name, directory / "new" / name
        _place_content(message.content_path, tmp, message.content, hardlink, durable)
        try:
            os.rename(tmp, new)
        except BaseException:
            _unlink(tmp)
            raise
        if durable:
            fsync_dir(directory / "new")
        return f"new/{name}"
    if not pop:
        final = directory / f"{message.id}.content"
        tmp = directory / f".{message.id}.content.tmp"
        _unlink(tmp)
        _place_content(message.content_path, tmp, message.content, hardlink, durable)
        os.replace(tmp, final)
        if durable:
            fsync_dir(directory)  # the content is in place before its envelope announces it
    replace_file(directory / f"{message.id}.envelope", envelope_bytes, durable=durable)
    return f"{message.id}.envelope"


# ---------------------------------------------------------------- the filters
def _options(spec: FilterSpec, allowed: dict[str, str]) -> set[str]:
    words = set()
    for word in spec.argument.split(";"):
        word = word.strip().lower()
        if not word:
            continue
        if word not in allowed:
            known = ", ".join(sorted(set(allowed.values())))
            raise FilterSpecError(f"{spec.text!r}: unknown option {word!r} (known: {known})")
        words.add(allowed[word])
    return words


def _delivery_dir(spec: FilterSpec) -> Path:
    relay = spec.relay
    configured = relay.plugin_settings("filters").delivery_dir if relay is not None else ""
    directory = Path(configured).expanduser() if configured else Path(relay.spool.directory)
    try:
        directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    except OSError as e:
        raise FilterSpecError(f"{spec.text!r}: cannot create delivery directory {directory}: {e.strerror}") from None
    return directory.resolve()


def _durable(spec: FilterSpec) -> bool:
    return bool(spec.relay.spool.durable) if spec.relay is not None else True


class _MailboxFilter:
    """Shared plumbing: the file work runs in a thread; I/O errors are temporary failures."""

    name = ""

    def __init__(self, spec: FilterSpec):
        self.directory = _delivery_dir(spec)
        self.durable = _durable(spec)

    async def __call__(self, message: Message, stage: Any) -> FilterResult:
        if message.content_path is None or message.envelope_path is None:
            return FilterResult.fail(TEMPFAIL, 451, "4.3.0", reason="message has no spool files")
        given_up = threading.Event()
        try:
            return await asyncio.to_thread(self.run, message, stage, given_up)
        except asyncio.CancelledError:
            # The chain gave up (timeout, shutdown) and will retry or refuse the message: the
            # thread must not remove or rewrite files that are no longer this run's to touch.
            given_up.set()
            raise
        except OSError as e:
            log.error("id=%s filter=%s failed in %s: %s", message.id, self.name, self.directory, e)
            return FilterResult.fail(TEMPFAIL, 451, "4.3.0", reason=f"{self.name} failed: {e}")

    def run(self, message: Message, stage: Any, given_up: threading.Event) -> FilterResult:
        raise NotImplementedError


def _check(given_up: threading.Event) -> None:
    if given_up.is_set():
        raise OSError("the filter chain gave up waiting; the message is left as it is")


class CopyFilter(_MailboxFilter):
    """``copy:[nodelete;hardlink;pop]``."""

    def __init__(self, spec: FilterSpec):
        words = _options(spec, {"n": "nodelete", "nodelete": "nodelete", "no_delete": "nodelete",
                                "h": "hardlink", "hardlink": "hardlink", "p": "pop", "pop": "pop"})
        if "pop" in words and spec.stage == "server":
            raise FilterSpecError(f"{spec.text!r}: copy:pop keeps the content in the spool, but at the server "
                                  "stage an abandoned message's content is discarded; use it as a "
                                  "--client-filter, or use copy:hardlink")
        super().__init__(spec)
        if "pop" in words and spec.relay is not None and self.directory != Path(spec.relay.spool.directory).resolve():
            # The spool's orphan sweep only knows that content is still wanted when the envelope
            # sits in one of the spool's own sub-directories.
            raise FilterSpecError(f"{spec.text!r}: copy:pop leaves the content in the spool, so its mailboxes "
                                  f"must be spool sub-directories, but --delivery-dir is {self.directory}; "
                                  "use copy:hardlink there")
        self.no_delete, self.hardlink, self.pop = "nodelete" in words, "hardlink" in words, "pop" in words
        self.name = spec.text.strip()
        self._warned = False

    def targets(self) -> tuple[list[Path], list[str]]:
        """The sub-directories to copy into, and the names skipped."""
        chosen: list[Path] = []
        skipped: list[str] = []
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if not entry.is_dir():
                    continue
                path = Path(entry.path)
                if entry.name.startswith(".") or entry.name == "postmaster" or (path / ARCHIVE_MARKER).exists():
                    skipped.append(entry.name)
                else:
                    chosen.append(path)
        return sorted(chosen), sorted(skipped)

    def run(self, message: Message, stage: Any, given_up: threading.Event) -> FilterResult:
        assert message.envelope_path is not None
        targets, skipped = self.targets()
        if not targets:
            if not self._warned:
                log.warning("filter=%s: no sub-directories of %s to copy into; messages pass unchanged",
                            self.name, self.directory)
                self._warned = True
            return FilterResult.ok()
        envelope_bytes = message.envelope_path.read_bytes()
        for target in targets:
            deliver_to(target, message, envelope_bytes, hardlink=self.hardlink, pop=self.pop, durable=self.durable)
        log.info("id=%s filter=%s copied to [%s]%s", message.id, self.name, ",".join(t.name for t in targets),
                 f" not [{','.join(skipped)}]" if skipped else "")
        if self.no_delete:
            return FilterResult.ok()
        _check(given_up)
        remove_message(message, keep_content=self.pop, durable=self.durable and stage == "client")
        return FilterResult.abandon()


class DeliverFilter(_MailboxFilter):
    """``deliver:[hardlink;nodelete]``."""

    edits_files = True  # a mixed message leaves with its remote recipients only

    def __init__(self, spec: FilterSpec):
        words = _options(spec, {"h": "hardlink", "hardlink": "hardlink", "n": "nodelete", "nodelete": "nodelete",
                                "no_delete": "nodelete", "p": "pop", "pop": "pop"})
        super().__init__(spec)
        self.no_delete, self.hardlink = "nodelete" in words, "hardlink" in words
        self.name = spec.text.strip()

    def run(self, message: Message, stage: Any, given_up: threading.Event) -> FilterResult:
        envelope = message.envelope
        mailboxes = sorted({r.mailbox for r in envelope.local_recipients if r.mailbox is not None})
        if not mailboxes:
            return FilterResult.ok()
        for mailbox in mailboxes:
            problem = mailbox_problem(mailbox)
            if problem is not None:
                log.error("id=%s filter=%s refusing mailbox %r: %s (check the address verifier)", message.id,
                          self.name, mailbox, problem)
                return FilterResult.fail(TEMPFAIL, 451, "4.3.0", reason=f"invalid mailbox name: {problem}")
        assert message.envelope_path is not None
        envelope_bytes = message.envelope_path.read_bytes()
        stored = []
        for mailbox in mailboxes:
            directory = self.directory / mailbox
            if not directory.is_dir():
                log.info("id=%s filter=%s creating mailbox %s", message.id, self.name, mailbox)
                _make_maildir(directory, self.durable)
            name = deliver_to(directory, message, envelope_bytes, hardlink=self.hardlink, durable=self.durable)
            stored.append(f"{mailbox}/{name}")
        log.info("id=%s filter=%s delivered to %s", message.id, self.name, ", ".join(stored))
        if self.no_delete:
            return FilterResult.ok()
        remote = envelope.remote_recipients
        _check(given_up)
        if not remote:
            remove_message(message, durable=self.durable and stage == "client")
            return FilterResult.abandon()
        rewrite_envelope(message, replace(envelope, recipients=remote), durable=self.durable and stage == "client")
        return FilterResult.ok()


@hookimpl
def relay_filter_factory(register: Callable[[str, Callable[[FilterSpec], Any]], None]) -> None:
    register("copy", CopyFilter)
    register("deliver", DeliverFilter)
