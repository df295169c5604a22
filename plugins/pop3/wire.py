"""A stored message as POP3 sends it: CRLF lines, byte-stuffed, read in chunks.

RFC 1939 3: every line ends in CRLF, a line starting with "." gets another "." in front, and
the multi-line response ends with ".CRLF". Maildirs written by other programs (Postfix's
``local``, procmail) end lines with a bare LF, so each bare LF is sent as CRLF, and a last line
without an end gets one. The size that STAT and LIST report is exactly the number of octets
that RETR then sends before the stuffing (RFC 1939 5, note on LIST), computed by
:func:`wire_size` with the same rules. Nothing here holds more than one chunk of a message.

Everything in this module blocks (file reads): the server calls it from worker threads.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

CHUNK = 64 * 1024
_BARE_LF = re.compile(rb"(?<!\r)\n")
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def open_message(path: Path) -> int:
    """Open a stored message for reading: a regular file, never through a symbolic link."""
    fd = os.open(path, _OPEN_FLAGS)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise IsADirectoryError(f"{path} is not a regular file")
    return fd


def wire_size(path: Path, chunk: int = CHUNK) -> int:
    """Octets RETR sends for the message at ``path`` before byte-stuffing (CRLF line ends)."""
    fd = open_message(path)
    try:
        total = bare = 0
        prev_cr, last = False, b""
        while True:
            data = os.read(fd, chunk)
            if not data:
                break
            total += len(data)
            bare += _bare_lf_count(data, prev_cr)
            prev_cr, last = data.endswith(b"\r"), data[-1:]
    finally:
        os.close(fd)
    return total + bare + (2 if total and last != b"\n" else 0)


def _bare_lf_count(data: bytes, prev_cr: bool) -> int:
    lead = prev_cr and data[:1] == b"\n"  # the CR of this CRLF ended the previous chunk
    return data.count(b"\n") - data.count(b"\r\n") - (1 if lead else 0)


def normalise(data: bytes, prev_cr: bool) -> bytes:
    """``data`` with each bare LF made CRLF; ``prev_cr``: the byte before ``data`` was a CR."""
    if not _bare_lf_count(data, prev_cr):
        return data
    if prev_cr and data[:1] == b"\n":
        return b"\n" + _BARE_LF.sub(b"\r\n", data[1:])
    return _BARE_LF.sub(b"\r\n", data)


class WireReader:
    """What RETR (``body_lines=None``) or ``TOP n`` (``body_lines=n``) sends for one message,
    without the final ".CRLF": call :meth:`read` until it returns ``b""``."""

    def __init__(self, fd: int, body_lines: int | None = None, chunk: int = CHUNK):
        self._fd = fd
        self._chunk = chunk
        self._prev_cr = False            # the last byte read from the file was a CR
        self._line_start = True          # the next octet sent starts a line (stuffing)
        self._in_headers = True          # TOP: the blank line after the headers is still to come
        self._remaining = body_lines     # TOP: body lines still to send; None for RETR
        self._partial = b""              # TOP: the start of a line not yet complete
        self._mid_line = False           # TOP: part of the current line was already sent
        self._ended_with_lf = True       # the unstuffed output so far ends a line (or is empty)
        self._done = False

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def read(self) -> bytes:
        """The next piece of the response, byte-stuffed; ``b""`` when the message is complete."""
        while not self._done:
            data = os.read(self._fd, self._chunk)
            if not data:
                self._done = True
                tail = self._partial
                self._partial = b""
                if tail or not self._ended_with_lf:
                    tail += b"\r\n"  # a last line without an end gets one
                return self._stuff(tail) if tail else b""
            text = normalise(data, self._prev_cr)
            self._prev_cr = data.endswith(b"\r")
            if self._remaining is not None:
                text = self._top(text)
            if text:
                return self._stuff(text)
        return b""

    def _stuff(self, text: bytes) -> bytes:
        self._ended_with_lf = text.endswith(b"\n")
        out = text.replace(b"\n.", b"\n..")
        if self._line_start and out.startswith(b"."):
            out = b"." + out
        self._line_start = self._ended_with_lf
        return out

    def _top(self, text: bytes) -> bytes:
        """Cut normalised text to the headers, the blank line and ``body_lines`` body lines."""
        text = self._partial + text
        self._partial = b""
        out: list[bytes] = []
        start = 0
        while start < len(text):
            end = text.find(b"\n", start)
            if end < 0:
                rest = text[start:]
                if len(rest) > self._chunk:  # a very long line goes out in pieces
                    out.append(rest)
                    self._mid_line = True
                else:
                    self._partial = rest
                break
            line = text[start:end + 1]
            start = end + 1
            if self._in_headers:
                if line == b"\r\n" and not self._mid_line:
                    self._in_headers = False
                out.append(line)
                self._mid_line = False
                if not self._in_headers and self._remaining == 0:
                    self._done = True
                    break
                continue
            assert self._remaining is not None
            out.append(line)
            self._mid_line = False
            self._remaining -= 1
            if self._remaining <= 0:
                self._done = True
                break
        return b"".join(out)
