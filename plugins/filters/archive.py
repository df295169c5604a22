"""``filter-archive``: ``archive:[DIR]``, a write-once, tamper-evident copy of every message.

Each message's content is stored once as ``DIR/<sha256>.eml`` (read-only; the same content
archived twice is one file), and one line is appended to ``DIR/index.jsonl``::

    {"time": "2025-01-31T12:00:00.000000Z", "id": "<spool id>", "sender": "a@b", "recipients": [...],
     "sha256": "<content hash>", "prev": "<SHA-256 of the previous line>"}

``prev`` chains the lines (the first line's is 64 zeros), so editing, removing or reordering a
line breaks the chain at the next one, and editing a stored message breaks its hash. ``relay
archive verify DIR`` checks both. The last line has no successor to protect it: the log line
and the ``message.archived`` event carry each new line's hash (``chain``), and ``verify --head``
checks that a hash recorded elsewhere is still in the chain.

Appends take an ``flock`` on the index, so several workers keep one chain; the file, the
directory and the index line are flushed before the filter answers. DIR defaults to
``<spool>/archive``; ``copy:`` does not copy into a directory holding an ``index.jsonl``.
The archive: filter belongs at the end of a chain, after the filters that may edit or reject.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import click

from mailrelay_sdk import FilterResult, Message, hookimpl

from mailrelay.filtering import FilterSpec, FilterSpecError

from .mailbox import fsync_dir, write_file

log = logging.getLogger("mailrelay.filters")

INDEX = "index.jsonl"
ZERO_HASH = "0" * 64
FIELDS = ("time", "id", "sender", "recipients", "sha256", "prev")
_HEX64 = re.compile(r"[0-9a-f]{64}")


def line_hash(line: bytes) -> str:
    """The chain hash of one index line (without its line end)."""
    return hashlib.sha256(line).hexdigest()


# ---------------------------------------------------------------- writing
def store_content(directory: Path, content: bytes, *, durable: bool = True) -> str:
    """Store ``content`` as ``<sha256>.eml`` (mode 0444) unless it is there; return the hash."""
    digest = hashlib.sha256(content).hexdigest()
    final = directory / f"{digest}.eml"
    if final.exists():
        return digest
    tmp = directory / f".{digest}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    write_file(tmp, content, durable, 0o444, exclusive=True)
    try:
        os.link(tmp, final)  # never replaces a file already archived
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    if durable:
        fsync_dir(directory)
    return digest


def _open_index(directory: Path, durable: bool) -> int:
    path = directory / INDEX
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o640)
    except FileExistsError:
        return os.open(path, os.O_RDWR | os.O_APPEND)
    if durable:
        fsync_dir(directory)
    return fd


def _last_line(fd: int, size: int) -> tuple[bytes, int]:
    """The last complete line (without its line end) and the offset where complete lines end."""
    position, buf, end = size, b"", -1
    while position > 0:
        start = max(0, position - 8192)
        buf = os.pread(fd, position - start, start) + buf
        position = start
        if end < 0:
            newline = buf.rfind(b"\n")
            if newline < 0:
                continue
            end = position + newline + 1
        before = buf.rfind(b"\n", 0, end - position - 1)
        if before >= 0:
            return buf[before + 1:end - position - 1], end
    if end < 0:
        return b"", 0
    return buf[:end - 1], end


def append_entry(directory: Path, entry: dict[str, Any], *, durable: bool = True) -> str:
    """Append ``entry`` (``prev`` is filled in) under an exclusive lock; return the new line's hash.

    A last line without a line end is an append that was interrupted before it was flushed (its
    message was never acknowledged); it is cut off so that the chain goes on from the last
    complete line.
    """
    fd = _open_index(directory, durable)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        last, end = _last_line(fd, size)
        if end != size:
            log.warning("archive %s: cutting off an incomplete last index line (%d bytes, an interrupted write)",
                        directory, size - end)
            os.ftruncate(fd, end)
        record = {**{k: entry[k] for k in FIELDS if k != "prev"}, "prev": line_hash(last) if end else ZERO_HASH}
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        os.write(fd, line + b"\n")  # O_APPEND: lands at the end even if another writer forgot the lock
        if durable:
            os.fsync(fd)
        return line_hash(line)
    finally:
        os.close(fd)  # drops the lock


def archive_message(directory: Path, content: bytes, entry: dict[str, Any], *,
                    durable: bool = True) -> tuple[str, str]:
    """Store the content, then index it; return (content hash, chain hash of the new line)."""
    digest = store_content(directory, content, durable=durable)
    return digest, append_entry(directory, {**entry, "sha256": digest}, durable=durable)


class ArchiveFilter:
    """``archive:[DIR]``: answers ok once the message is archived, a temporary failure if it cannot be."""

    def __init__(self, spec: FilterSpec):
        text = spec.argument.strip()
        if text:
            directory = Path(text).expanduser()
        elif spec.relay is not None:
            directory = Path(spec.relay.spool.directory) / "archive"
        else:
            raise FilterSpecError(f"{spec.text!r}: archive: needs a directory")
        self.directory = directory.absolute()
        self.durable = bool(spec.relay.spool.durable) if spec.relay is not None else True
        self.emit = spec.relay.emit if spec.relay is not None else None
        try:
            self.directory.mkdir(mode=0o750, parents=True, exist_ok=True)
            os.close(_open_index(self.directory, self.durable))  # marks it as an archive for copy:
        except OSError as e:
            raise FilterSpecError(f"{spec.text!r}: cannot use archive directory {self.directory}: "
                                  f"{e.strerror or e}") from None
        self.name = "archive:" + (text or "")

    async def __call__(self, message: Message, stage: Any) -> FilterResult:
        envelope = message.envelope
        entry = {"time": datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z"),
                 "id": message.id, "sender": envelope.sender,
                 "recipients": [r.address for r in envelope.recipients]}
        try:
            digest, chain = await asyncio.to_thread(archive_message, self.directory, message.content, entry,
                                                    durable=self.durable)
        except OSError as e:
            log.error("id=%s filter=%s cannot archive into %s: %s", message.id, self.name, self.directory, e)
            return FilterResult.fail("Temporary local problem, please try again later", 451, "4.3.0",
                                     reason=f"archive failed: {e}")
        log.info("id=%s filter=archive: archived sha256=%s chain=%s dir=%s", message.id, digest, chain, self.directory)
        if self.emit is not None:
            self.emit("message.archived", message_id=message.id, sha256=digest, chain=chain,
                      directory=str(self.directory))
        return FilterResult.ok()


# ---------------------------------------------------------------- checking
@dataclass(frozen=True)
class Verification:
    """What ``verify_archive`` found: ``problem`` is empty when the archive is intact."""

    lines: int
    files: int
    head: str
    problem: str = ""
    note: str = ""

    @property
    def intact(self) -> bool:
        return not self.problem


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_archive(directory: Path, expect_head: str = "") -> Verification:
    """Check every index line's ``prev`` and every stored file's hash; stop at the first problem."""
    index = directory / INDEX
    if not index.is_file():
        return Verification(0, 0, ZERO_HASH, f"{index} does not exist: not an archive directory")
    prev, count, note = ZERO_HASH, 0, ""
    checked: dict[str, bool] = {}
    seen_head = not expect_head
    with open(index, "rb") as f:
        for number, raw in enumerate(f, 1):
            where = f"{INDEX} line {number}"
            if not raw.endswith(b"\n"):
                note = f"{where} is incomplete (an interrupted write, never acknowledged) and was not checked"
                break
            line = raw[:-1]
            try:
                record = json.loads(line)
            except ValueError as e:
                return Verification(count, len(checked), prev, f"{where} is not valid JSON ({e})")
            if not isinstance(record, dict) or any(k not in record for k in FIELDS):
                return Verification(count, len(checked), prev, f"{where} lacks fields (needs {', '.join(FIELDS)})")
            if record["prev"] != prev:
                what = ("the first line must start the chain with the zero hash" if number == 1 else
                        f"it is not the hash of line {number - 1}: line {number - 1} was edited, or lines "
                        "were removed or reordered")
                return Verification(count, len(checked), prev, f"{where}: prev is wrong, {what}")
            digest = record["sha256"]
            if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
                return Verification(count, len(checked), prev, f"{where}: sha256 {digest!r} is not a SHA-256")
            if digest not in checked:
                stored = directory / f"{digest}.eml"
                if not stored.is_file():
                    return Verification(count, len(checked), prev,
                                        f"{where} (id {record['id']}): {stored.name} is missing")
                actual = _file_hash(stored)
                if actual != digest:
                    return Verification(count, len(checked), prev,
                                        f"{where} (id {record['id']}): {stored.name} was modified "
                                        f"(its SHA-256 is now {actual})")
                checked[digest] = True
            prev = line_hash(line)
            seen_head = seen_head or prev == expect_head
            count += 1
    if not seen_head:
        return Verification(count, len(checked), prev,
                            f"no line has the recorded hash {expect_head}: lines were removed or changed since")
    return Verification(count, len(checked), prev, note=note)


@click.group("archive")
def archive_cli() -> None:
    """Archives written by the archive: filter."""


@archive_cli.command("verify")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--head", "expect_head", default="", metavar="SHA256",
              help="a chain hash recorded earlier (log line or message.archived event) that must still be there")
def verify_command(directory: Path, expect_head: str) -> None:
    """Check an archive's hash chain and stored messages; exit 1 at the first broken line."""
    result = verify_archive(directory, expect_head.strip().lower())
    if not result.intact:
        click.echo(f"archive {directory}: BROKEN: {result.problem}")
        click.echo(f"({result.lines} line(s) before it verified)")
        raise SystemExit(1)
    click.echo(f"archive {directory}: intact: {result.lines} message(s), {result.files} stored file(s), "
               f"head {result.head}")
    if result.note:
        click.echo(f"note: {result.note}")


@hookimpl
def relay_filter_factory(register: Callable[[str, Callable[[FilterSpec], Any]], None]) -> None:
    register("archive", ArchiveFilter)


@hookimpl
def relay_cli(cli: click.Group) -> None:
    cli.add_command(archive_cli)
