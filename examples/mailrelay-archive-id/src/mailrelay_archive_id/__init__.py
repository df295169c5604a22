"""mailrelay-archive-id: stamps every accepted message with a unique ``X-Archive-Id`` header.

An archive, a ticket system or a help desk can quote the id; it is set at reception
(``on_receive``), before the message is written, so the spooled copy, every filter and the
forwarded message carry it. An ``X-Archive-Id`` the client sent is removed first: only the relay
assigns them.

    [plugins]
    enable = ["archive-id"]

    [archive_id]
    header = "X-Archive-Id"   # the header field to set
    prefix = "mx1-"           # put before each id (e.g. which relay assigned it)
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

from mailrelay_sdk import Message, Relay, Verdict, hookimpl

__version__ = "0.1.0"

_FIELD_NAME = re.compile(r"[!-9;-~]+")


@dataclass
class Settings:
    """The ``[archive_id]`` section of relay.conf."""

    header: str = "X-Archive-Id"
    prefix: str = ""


def new_archive_id(prefix: str = "") -> str:
    """A unique id: the prefix and 32 hex digits of a random UUID."""
    return f"{prefix}{uuid.uuid4().hex}"


def stamp(content: bytes, header: str, value: str) -> bytes:
    """``content`` with every ``header`` field removed and ``header: value`` put on top."""
    head, sep, body = content.partition(b"\r\n\r\n")
    name = header.lower().encode()
    kept, dropping = [], False
    for line in head.split(b"\r\n") if head else []:
        if line[:1] in (b" ", b"\t"):   # a continuation line goes with its field
            if not dropping:
                kept.append(line)
            continue
        dropping = line.split(b":", 1)[0].strip().lower() == name
        if not dropping:
            kept.append(line)
    return f"{header}: {value}\r\n".encode() + b"\r\n".join(kept) + sep + body


class Plugin:
    """The entry point names this class; the relay makes one instance per relay."""

    #: The mailrelay versions this plugin works with (a PEP 440 specifier), checked at start-up.
    requires_core = ">=0.1"
    #: The hook spec version it was written for (``mailrelay_sdk.HOOKSPEC_VERSION``).
    hookspec_version = 1

    def __init__(self) -> None:
        self.settings = Settings()

    @hookimpl
    def relay_config_schema(self) -> dict[str, type]:
        return {"archive_id": Settings}

    @hookimpl
    def relay_startup(self, relay: Relay) -> None:
        self.settings = relay.plugin_settings("archive_id")
        if not _FIELD_NAME.fullmatch(self.settings.header):
            raise ValueError(f"[archive_id] header: {self.settings.header!r} is not a header field name")
        if any(not 0x21 <= ord(c) <= 0x7E for c in self.settings.prefix):
            raise ValueError("[archive_id] prefix: printable ASCII without spaces only")

    @hookimpl
    def on_receive(self, message: Message) -> Verdict | None:
        """Stamp the message; never refuses one."""
        archive_id = new_archive_id(self.settings.prefix)
        message.replace_content(stamp(message.content, self.settings.header, archive_id))
        message.notes["archive_id"] = archive_id
        return None
