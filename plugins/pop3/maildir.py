"""A maildir as a POP3 mailbox: messages in ``new/`` and ``cur/``; ``tmp/`` is never looked at.

A message's unique id (UIDL) is its maildir base name: the file name up to the ``:`` that starts
the flags, without the ``,S=``/``,W=`` size fields some servers add, so it stays the same when
the message moves to ``cur/`` or its flags change, in this session or the next. Retrieved
messages that are not deleted go to ``cur/`` with the ``S`` (seen) flag at QUIT, as a maildir
reader does on reading. Files that are not regular files (symbolic links, sockets) and names
starting with a dot are ignored.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Iterable

from .mailbox import Mailbox, StoredMessage, fsync_dir, uid_for

log = logging.getLogger("mailrelay.pop3")

SUBDIRS = ("new", "cur")
_SIZE_FIELDS = re.compile(r",[SW]=\d+")


def unique_name(filename: str) -> str:
    """The maildir base name of ``filename``: no flags, no size fields."""
    return _SIZE_FIELDS.sub("", filename.split(":", 1)[0])


def with_seen_flag(filename: str) -> str:
    """``filename`` with the ``S`` flag in its ``:2,`` info (added when missing)."""
    base, colon, info = filename.partition(":")
    if colon and info.startswith("2,"):
        flags = set(info[2:])
        if "S" in flags:
            return filename
        return f"{base}:2,{''.join(sorted(flags | {'S'}))}"
    return f"{base}:2,S"


def is_maildir(directory: Path) -> bool:
    return all((directory / sub).is_dir() for sub in ("tmp", "new", "cur"))


def _checked(name: str) -> tuple[str, str]:
    """``new/<file>`` or ``cur/<file>``, split; ValueError for anything else (a journal entry
    must not name a file outside the mailbox)."""
    sub, slash, filename = name.partition("/")
    if sub not in SUBDIRS or not slash or not filename or "/" in filename or filename in (".", ".."):
        raise ValueError(f"not a maildir message name: {name!r}")
    return sub, filename


class Maildir(Mailbox):
    """One maildir, locked for the session."""

    def scan(self) -> list[StoredMessage]:
        found: list[tuple[int, str, StoredMessage]] = []
        seen_uids: dict[str, str] = {}
        for sub in SUBDIRS:
            try:
                entries = os.scandir(self.directory / sub)
            except FileNotFoundError:
                continue
            with entries:
                for entry in entries:
                    if entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
                        continue
                    try:
                        st = entry.stat(follow_symlinks=False)
                        size = self.sizes.size_of(Path(entry.path), st)
                    except FileNotFoundError:  # moved or removed by another program meanwhile
                        continue
                    except OSError as e:
                        log.warning("pop3: %s: skipped, cannot read: %s", entry.path, e)
                        continue
                    name = f"{sub}/{entry.name}"
                    uid = uid_for(unique_name(entry.name))
                    if uid in seen_uids:  # the same base name twice (new/ and cur/): keep both, distinct
                        log.warning("pop3: %s: %s and %s share a base name", self.directory, seen_uids[uid], name)
                        uid = uid_for(f"{unique_name(entry.name)}/{sub}")
                    seen_uids[uid] = name
                    found.append((st.st_mtime_ns, entry.name, StoredMessage(uid, size, name)))
        found.sort(key=lambda item: (item[0], item[1]))
        return [message for _, _, message in found]

    def content_path(self, message: StoredMessage) -> Path:
        sub, filename = _checked(message.name)
        path = self.directory / sub / filename
        if path.exists():
            return path
        moved = self._find(unique_name(filename))
        if moved is None:
            raise FileNotFoundError(f"{path}: no longer in the mailbox")
        message.name = moved
        return self.directory / moved

    def _find(self, unique: str) -> str | None:
        """The current name of the message with base name ``unique`` (another program may have
        renamed it, changing its flags or moving it to ``cur/``)."""
        for sub in ("cur", "new"):
            try:
                with os.scandir(self.directory / sub) as entries:
                    for entry in entries:
                        if not entry.name.startswith(".") and unique_name(entry.name) == unique:
                            return f"{sub}/{entry.name}"
            except FileNotFoundError:
                continue
        return None

    def remove(self, name: str) -> bool:
        sub, filename = _checked(name)
        try:
            os.unlink(self.directory / sub / filename)
            return True
        except FileNotFoundError:
            pass
        moved = self._find(unique_name(filename))
        if moved is not None:
            try:
                os.unlink(self.directory / moved)
            except FileNotFoundError:
                pass
        return True

    def mark_seen(self, messages: list[StoredMessage]) -> None:
        moved = False
        for message in messages:
            sub, filename = _checked(message.name)
            target = f"cur/{with_seen_flag(filename)}"
            if target == message.name:
                continue
            try:
                os.rename(self.directory / sub / filename, self.directory / target)
            except FileNotFoundError:  # moved by another program: it keeps its flags
                continue
            except OSError as e:
                log.warning("pop3: %s: cannot mark %s seen: %s", self.directory, message.name, e)
                continue
            message.name, moved = target, True
        if moved and self.durable:
            for sub in SUBDIRS:
                fsync_dir(self.directory / sub)

    def directories(self) -> Iterable[Path]:
        return [self.directory / sub for sub in SUBDIRS]
