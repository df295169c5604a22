"""``filter-builtin``: E-MailRelay's small built-in filters.

* ``exit:N``: behave like a program that exits with ``N`` (``exit:103`` asks for a rescan).
* ``msgid:``: add ``Message-ID: <unique@relay-domain>`` at the top of the headers when the
  message has none.
* ``split:`` and ``mx:`` (message routing by recipient domain): see ``routing_filters``.
"""

from __future__ import annotations

import itertools
import os
import secrets
import time
from typing import Any, Callable

from mailrelay_sdk import FilterResult, Message, hookimpl

from mailrelay.filtering import FilterSpec, FilterSpecError, result_from_exit

from .routing_filters import MxFilter, SplitFilter

_sequence = itertools.count()


class ExitFilter:
    in_memory = True  # works on message.content only: no need to write edits to the file first

    def __init__(self, spec: FilterSpec, reject_code: int = 550):
        text = spec.argument.strip()
        if not text.isdigit() or int(text) > 255:
            raise FilterSpecError(f"{spec.text!r}: exit: needs an exit code 0-255")
        self.code = int(text)
        self.name = f"exit:{self.code}"
        self.reject_code = reject_code

    async def __call__(self, message: Message, stage: Any) -> FilterResult:
        return result_from_exit(self.code, stage, reject_code=self.reject_code)


def has_message_id(content: bytes) -> bool:
    """True when the header section (up to the first empty line) has a ``Message-ID`` field,
    whatever its case, even an empty one (E-MailRelay counts that too)."""
    for line in content.split(b"\n"):
        line = line.rstrip(b"\r")
        if not line:
            return False
        if line[:1] in (b" ", b"\t"):
            continue  # a folded continuation of the previous field
        name, colon, _ = line.partition(b":")
        if colon and name.rstrip(b" \t").lower() == b"message-id":
            return True
    return False


def new_message_id(domain: str) -> str:
    """``<seconds.microseconds.pid.counter.random@domain>``: unique across processes and restarts."""
    now = time.time_ns() // 1000
    return f"<{now // 1_000_000}.{now % 1_000_000:06d}.{os.getpid()}.{next(_sequence)}.{secrets.token_hex(4)}@{domain}>"


class MessageIdFilter:
    """``msgid:``: the new content goes back as ``FilterResult.content``; the chain writes it."""

    in_memory = True  # works on message.content only: no need to write edits to the file first

    name = "msgid:"

    def __init__(self, spec: FilterSpec, domain: str):
        if spec.argument.strip():
            raise FilterSpecError(f"{spec.text!r}: msgid: takes no argument (the domain is --domain)")
        self.domain = domain

    async def __call__(self, message: Message, stage: Any) -> FilterResult:
        if has_message_id(message.content):
            return FilterResult.ok()
        header = f"Message-ID: {new_message_id(self.domain)}\r\n".encode("ascii", "replace")
        return FilterResult.ok(header + message.content)


def _reject_code(spec: FilterSpec) -> int:
    return spec.relay.plugin_settings("filters").reject_code if spec.relay is not None else 550


def _domain(spec: FilterSpec) -> str:
    return str(spec.relay.domain) if spec.relay is not None else "localhost"


@hookimpl
def relay_filter_factory(register: Callable[[str, Callable[[FilterSpec], Any]], None]) -> None:
    register("exit", lambda spec: ExitFilter(spec, _reject_code(spec)))
    register("msgid", lambda spec: MessageIdFilter(spec, _domain(spec)))
    register("split", SplitFilter)
    register("mx", MxFilter)
