"""Spool file writes and renames for the commit thread that keep the GIL across the system call.

Python's ``os`` functions release the GIL around every system call, and the thread must then
win it back. For the spool's commit thread that is seven handoffs a message (open, write and
close for the content and for the envelope, then the rename), and each one waits for the event
loop to finish its current callback. On a busy relay a message's writes took 0.8 ms of wall
time for 0.15 ms of work, so commit batches grew, and every client's 250 waited for them.
Called through :class:`ctypes.PyDLL`, the C library's functions run with the GIL held: a batch's
writes go in one stretch, and the event loop waits once, for about as long as the work takes.

The price is that the event loop cannot run while such a call does, so :class:`HeldSyscalls` is
used only where calls are known to be quick: on a local file system (:func:`local_file_system`),
for small batches, and not for a while after a batch was slow (the commit thread's policy).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from typing import Callable, Sequence

# File systems whose metadata operations are served from memory and local disk; anything else
# (NFS, CIFS, FUSE, Ceph, ...) may wait on the network and keeps the GIL-releasing os calls.
LOCAL_FILE_SYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "jfs", "reiserfs",
                                "tmpfs", "ramfs", "zfs", "bcachefs"})


class HeldSyscalls:
    """``open``, ``writev``, ``write``, ``close`` and ``rename`` with the signatures and errors of
    the :mod:`os` functions of those names (the committer calls either), from the C library,
    called without releasing the GIL."""

    def __init__(self, libc: ctypes.PyDLL):
        self._open = _function(libc, "open", ctypes.c_int, [ctypes.c_char_p, ctypes.c_int, ctypes.c_uint])
        self._write = _function(libc, "write", ctypes.c_ssize_t, [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t])
        self._close = _function(libc, "close", ctypes.c_int, [ctypes.c_int])
        self._rename = _function(libc, "rename", ctypes.c_int, [ctypes.c_char_p, ctypes.c_char_p])

    @classmethod
    def load(cls) -> HeldSyscalls | None:
        """The C library's calls, or None where ctypes cannot load it."""
        try:
            return cls(ctypes.PyDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True))
        except (OSError, AttributeError):
            return None

    def open(self, path: str, flags: int, mode: int = 0o777) -> int:
        name = os.fsencode(path)
        return _retry(lambda: self._open(name, flags, mode), path)

    def writev(self, fd: int, parts: Sequence[bytes]) -> int:
        # Joined: the committer keeps these calls for batches small enough to copy.
        return self.write(fd, parts[0] if len(parts) == 1 else b"".join(parts))

    def write(self, fd: int, data: bytes) -> int:
        return _retry(lambda: self._write(fd, data, len(data)), None)

    def close(self, fd: int) -> None:
        if self._close(fd) != 0:  # never retried: on Linux the descriptor is gone either way
            raise _last_error(None)

    def rename(self, src: str, dst: str) -> None:
        if self._rename(os.fsencode(src), os.fsencode(dst)) != 0:
            raise _last_error(src)


def local_file_system(path: str, mountinfo: str | None = None) -> bool:
    """Whether ``path`` lies on a file system in :data:`LOCAL_FILE_SYSTEMS`, going by the
    longest mount point that contains it in ``/proc/self/mountinfo`` (or ``mountinfo``, its
    text). False when that cannot be told."""
    if mountinfo is None:
        try:
            with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
                mountinfo = f.read()
        except OSError:
            return False
    target = os.path.realpath(path)
    best, fs_type = "", ""
    for line in mountinfo.splitlines():
        # "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue"
        fields, _, tail = line.partition(" - ")
        fields_list, tail_list = fields.split(), tail.split()
        if len(fields_list) < 5 or not tail_list:
            continue
        mount_point = _unescape(fields_list[4])
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, fs_type = mount_point, tail_list[0]
    return fs_type in LOCAL_FILE_SYSTEMS


def _unescape(field: str) -> str:
    """Mount points in mountinfo have space, tab, newline and backslash as octal escapes."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def _function(libc: ctypes.PyDLL, name: str, restype: type, argtypes: list[type]):
    fn = getattr(libc, name)
    fn.restype = restype
    fn.argtypes = argtypes
    return fn


def _retry(call: Callable[[], int], path: str | None) -> int:
    """``call()``'s result, called again after EINTR; an error as OSError."""
    while True:
        result = call()
        if result >= 0:
            return result
        error = _last_error(path)
        if error.errno != errno.EINTR:
            raise error


def _last_error(path: str | None) -> OSError:
    code = ctypes.get_errno()
    return OSError(code, os.strerror(code), path)
