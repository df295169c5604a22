"""The commit marker: how a crash recovery knows that a ``.envelope.new`` was committed, whole.

The commit thread publishes a message (renames ``.envelope.new`` to ``.envelope``) after the flush
that made its files durable, and answers the client then, without a second flush for the rename:
the next batch's flush carries it, or an fsync of the directory after 50 ms without a batch. If the
system goes down in between, the rename can be lost while the client has its 250. So the envelope
the commit flushes ends with one more line, after ``End`` (where E-MailRelay stops reading):

    X-MailRelay-Committed: to=ready size=4123 crc32=1a2b3c4d envelope-crc32=0f1e2d3c

``size`` and ``crc32`` are the content file's, ``envelope-crc32`` covers every byte of the envelope
before this line, and ``to`` is the state the commit publishes into (``ready`` or ``bad``). A
``.new`` whose marker matches its files was complete and filtered when the flush began; one that
was written but not flushed, or only half written, does not match. Server filters see the
envelope before the marker exists, and any later rewrite of the envelope drops it.
"""

from __future__ import annotations

import os
import re
import zlib
from dataclasses import dataclass
from typing import Iterable, Literal

PublishState = Literal["ready", "bad"]
FIELD = b"X-MailRelay-Committed: "
_LINE = re.compile(rb"X-MailRelay-Committed: to=(ready|bad) size=(\d+) crc32=([0-9a-f]{8}) "
                   rb"envelope-crc32=([0-9a-f]{8})\r\n\Z")


@dataclass(frozen=True)
class Marker:
    to: PublishState
    size: int
    crc32: int


def checksum(parts: Iterable[bytes]) -> tuple[int, int]:
    """(size, CRC-32) of the concatenation of ``parts``."""
    size = crc = 0
    for part in parts:
        size += len(part)
        crc = zlib.crc32(part, crc)
    return size, crc


def marked(envelope: bytes, content: tuple[int, int], to: PublishState) -> bytes:
    """``envelope`` without any marker, with CRLF line ends (a server filter may have written
    LF, or no final line end), followed by its marker line for ``content``'s (size, crc)."""
    envelope = unmarked(envelope).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if envelope and not envelope.endswith(b"\r\n"):
        envelope += b"\r\n"
    size, crc = content
    return envelope + (b"%sto=%s size=%d crc32=%08x envelope-crc32=%08x\r\n"
                       % (FIELD, to.encode(), size, crc, zlib.crc32(envelope)))


def _final_marker(envelope: bytes) -> tuple[int, re.Match[bytes]] | None:
    """(where the marker line starts, its match) if the envelope's last line is a marker line."""
    at = envelope.rfind(b"\n" + FIELD)
    if at < 0:
        return None
    match = _LINE.match(envelope, at + 1)
    return (at + 1, match) if match is not None else None


def unmarked(envelope: bytes) -> bytes:
    """``envelope`` without its final marker line, if it ends with one (an earlier commit's)."""
    found = _final_marker(envelope)
    return envelope[:found[0]] if found is not None else envelope


def read_marker(envelope: bytes) -> Marker | None:
    """The marker if the envelope ends with one that matches the bytes before it, else None."""
    found = _final_marker(envelope)
    if found is None:
        return None
    at, match = found
    if int(match.group(4), 16) != zlib.crc32(envelope[:at]):
        return None
    return Marker(match.group(1).decode(), int(match.group(2)), int(match.group(3), 16))  # type: ignore[arg-type]


def content_matches(marker: Marker, content_path: str | os.PathLike[str]) -> bool:
    """The content file has exactly the size and checksum the marker recorded."""
    try:
        with open(content_path, "rb") as f:
            if os.fstat(f.fileno()).st_size != marker.size:
                return False
            crc = 0
            while chunk := f.read(1 << 20):
                crc = zlib.crc32(chunk, crc)
    except OSError:
        return False
    return crc == marker.crc32
