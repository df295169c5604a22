"""E-MailRelay's layout as a POP3 mailbox: each ready ``<id>.envelope`` is a message.

This is what E-MailRelay's own POP server serves: the spool directory itself (without
``--pop-by-name``), or a user's sub-directory that ``copy:`` filled. The content is
``<id>.content`` beside the envelope, or, left there by ``copy:pop``, in the spool directory.
The UIDL is the spool id.

Removing a message from the spool itself first claims it the way the queue runner does
(``.envelope`` renamed to ``.busy`` and locked), so a message that is being forwarded at that
moment is never removed under the forwarder; it stays, and the client is told. A content file in
the spool is removed only when no envelope names it any more, in the spool or in any mailbox
(E-MailRelay's rule for ``copy:pop``).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Iterable

from mailrelay.queue.claim import claim
from mailrelay.queue.state import remove_state
from mailrelay.spool.store import is_valid_id

from .mailbox import Mailbox, SizeCache, StoredMessage, uid_for

READY = ".envelope"
ENVELOPE_STATES = (".envelope", ".envelope.busy", ".envelope.new", ".envelope.bad")


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


class SpoolDirectory(Mailbox):
    """A directory of E-MailRelay envelope and content files."""

    def __init__(self, directory: Path, *, spool_dir: Path, mailbox_root: Path | None, durable: bool,
                 sizes: SizeCache):
        super().__init__(directory, durable=durable, sizes=sizes)
        self.spool_dir = spool_dir
        self.mailbox_root = mailbox_root  # with --pop-by-name: where the other users' mailboxes are
        self.is_spool = directory == spool_dir

    def scan(self) -> list[StoredMessage]:
        found: list[tuple[int, str, StoredMessage]] = []
        with os.scandir(self.directory) as entries:
            for entry in entries:
                message_id = entry.name[: -len(READY)]
                if not entry.name.endswith(READY) or not is_valid_id(message_id):
                    continue
                if not entry.is_file(follow_symlinks=False):
                    continue
                try:
                    content = self._content(message_id)
                    if content is None:
                        continue  # an envelope without content (being removed): not a message
                    st = os.lstat(content)
                    size = self.sizes.size_of(content, st)
                    order = entry.stat(follow_symlinks=False).st_mtime_ns
                except FileNotFoundError:  # forwarded or removed meanwhile
                    continue
                found.append((order, message_id, StoredMessage(uid_for(message_id), size, message_id)))
        found.sort(key=lambda item: (item[0], item[1]))
        return [message for _, _, message in found]

    def _content(self, message_id: str) -> Path | None:
        own = self.directory / f"{message_id}.content"
        if _is_regular(own):
            return own
        shared = self.spool_dir / f"{message_id}.content"
        if not self.is_spool and _is_regular(shared):
            return shared
        return None

    def content_path(self, message: StoredMessage) -> Path:
        if not is_valid_id(message.name) or not (self.directory / f"{message.name}{READY}").exists():
            raise FileNotFoundError(f"{message.name}: no longer in the mailbox")
        content = self._content(message.name)
        if content is None:
            raise FileNotFoundError(f"{message.name}: its content is gone")
        return content

    def remove(self, name: str) -> bool:
        if not is_valid_id(name):
            raise ValueError(f"not a spool id: {name!r}")
        if self.is_spool:
            claimed = claim(self.directory, name)
            if claimed is None:  # being forwarded right now, or gone already
                return not (self.directory / f"{name}.envelope.busy").exists()
            try:
                self._remove_content(name, self.directory / f"{name}.content")
                remove_state(self.directory, name)
                _unlink(claimed.busy_path)
            finally:
                claimed.finish()
            return True
        _unlink(self.directory / f"{name}{READY}")
        own = self.directory / f"{name}.content"
        if _is_regular(own):
            _unlink(own)
        else:
            self._remove_content(name, self.spool_dir / f"{name}.content")
        return True

    def _remove_content(self, message_id: str, path: Path) -> None:
        """Remove content in the spool unless another envelope still names it."""
        if not self._referenced(message_id):
            _unlink(path)

    def _referenced(self, message_id: str) -> bool:
        others = [self.spool_dir] if not self.is_spool else []
        for root in dict.fromkeys(r for r in (self.spool_dir, self.mailbox_root) if r is not None):
            try:
                with os.scandir(root) as entries:
                    others += [Path(e.path) for e in entries
                               if e.is_dir(follow_symlinks=False) and not e.name.startswith(".")]
            except FileNotFoundError:
                continue
        return any((d / f"{message_id}{suffix}").exists() for d in others if d != self.directory
                   for suffix in ENVELOPE_STATES)

    def directories(self) -> Iterable[Path]:
        return dict.fromkeys([self.directory, self.spool_dir])


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
