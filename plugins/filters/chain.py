"""Run one stage's filters in order, keeping the message and its spool files in step.

Content a filter returns replaces the message in memory, and reaches the content file before the
next filter that reads files (any filter without ``in_memory = True``) or at the end: at the client
stage atomically and durably here, at the server stage by the commit that publishes the message.
After a filter that edits the files itself (``edits_files = True``) they are read back. Every run
emits ``filter.done``. A filter that raises, overruns or answers nonsense is a temporary failure, never a lost message.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import replace
from typing import Any, Callable

from mailrelay_sdk import Envelope, FilterAction, FilterResult, Message

from mailrelay.filtering import Filter, FilterSpec
from mailrelay.spool import fsync_dir

log = logging.getLogger("mailrelay.filters")

TEMPFAIL = "Temporary local problem, please try again later"
GRACE = 5.0  # on top of a filter's own timeout, before the chain gives up on it


class FilterChain:
    def __init__(self, stage: str, filters: list[tuple[FilterSpec, Filter]], *,
                 emit: Callable[..., None], durable: bool = True):
        self.stage = stage
        self.filters = filters
        self.emit = emit
        self.durable = durable

    def __bool__(self) -> bool:
        return bool(self.filters)

    @property
    def time_limit(self) -> float:
        """The longest a whole run may take (every filter up to its own limit)."""
        return sum(spec.timeout + GRACE for spec, _ in self.filters) + GRACE

    async def run(self, message: Message) -> FilterResult:
        rescan = stop = False
        unwritten = False  # message.content is newer than the content file
        for spec, flt in self.filters:
            started = time.perf_counter()
            result = None
            if unwritten and not getattr(flt, "in_memory", False):
                result = await self._write(flt, message)  # this filter reads the files
                unwritten = False
            if result is None:
                result = await self._run_one(spec, flt, message)
            if result.action is FilterAction.OK:
                if result.content is not None:
                    message.replace_content(result.content)
                    unwritten = True
                elif getattr(flt, "edits_files", False):
                    result = await self._read_back(flt, message) or result
            rescan |= result.rescan
            stop |= result.stop_scanning
            elapsed = time.perf_counter() - started
            self.emit("filter.done", message_id=message.id, filter=flt.name, spec=spec.text, stage=self.stage,
                      verdict=result.action.value, code=result.code, text=result.text,
                      duration_ms=round(elapsed * 1000, 1))
            if result.action is not FilterAction.OK:
                log.info("id=%s %s-filter=%s verdict=%s%s%s", message.id, self.stage, flt.name, result.action.value,
                         f" code={result.code} response={result.text!r}" if result.code else "",
                         f" reason={result.reason!r}" if result.reason and result.reason != result.text else "")
                return replace(result, content=None, rescan=rescan, stop_scanning=stop)
        if unwritten:
            if self.stage == "server":
                # The commit that publishes the message writes it, in the same trip to the disk.
                return FilterResult(FilterAction.OK, content=message.content, rescan=rescan, stop_scanning=stop)
            problem = await self._write(None, message)
            if problem is not None:
                return replace(problem, rescan=rescan, stop_scanning=stop)
        return FilterResult(FilterAction.OK, rescan=rescan, stop_scanning=stop)

    async def _run_one(self, spec: FilterSpec, flt: Filter, message: Message) -> FilterResult:
        try:
            async with asyncio.timeout(spec.timeout + GRACE):
                result = await flt(message, self.stage)  # type: ignore[arg-type]
        except TimeoutError:
            log.error("id=%s filter=%s gave no answer within %gs", message.id, flt.name, spec.timeout + GRACE)
            return FilterResult.fail(TEMPFAIL, 451, "4.3.0", reason="filter timed out")
        except Exception as e:
            log.exception("id=%s filter=%s failed: %s", message.id, flt.name, e)
            return FilterResult.fail(TEMPFAIL, 451, "4.3.0", reason=f"{type(e).__name__}: {e}")
        if not isinstance(result, FilterResult):
            log.error("id=%s filter=%s returned %r, not a FilterResult", message.id, flt.name, result)
            return FilterResult.fail(TEMPFAIL, 451, "4.3.0", reason="filter returned nonsense")
        return result

    async def _write(self, flt: Any, message: Message) -> FilterResult | None:
        """Write edited content to the file before a filter that reads files (or at the end)."""
        try:
            await asyncio.to_thread(self._write_content, message, message.content)
        except OSError as e:
            log.error("id=%s edited content cannot be written%s: %s", message.id,
                      f" for filter={flt.name}" if flt is not None else "", e)
            return FilterResult.fail(TEMPFAIL, 451, "4.3.0", reason=f"cannot write edited content: {e}")
        return None

    async def _read_back(self, flt: Any, message: Message) -> FilterResult | None:
        """After a filter that edits the files itself, the message follows the files."""
        try:
            content, envelope = await asyncio.to_thread(_read_back, message)
        except FileNotFoundError:
            log.error("id=%s filter=%s said ok but the message files are gone (a filter that deletes "
                      "the message should exit 100)", message.id, flt.name)
            return FilterResult.fail(TEMPFAIL, 451, "4.3.0", reason="message files disappeared")
        except (OSError, ValueError) as e:
            log.error("id=%s after filter=%s the message cannot be read back: %s", message.id, flt.name, e)
            return FilterResult.fail(TEMPFAIL, 451, "4.3.0", reason=f"unreadable after filter: {e}")
        if content != message.content:
            message.replace_content(content)
        message.envelope = envelope
        return None

    def _write_content(self, message: Message, content: bytes) -> None:
        path = message.content_path
        if path is None:
            return
        # A new file renamed over the old one: an earlier filter may have hard-linked the content
        # into a mailbox (copy:hardlink), and an edit must not change that copy.
        # At the server stage the commit that follows flushes it; at the client stage the message
        # is published, so the edit is made durable before anything is forwarded.
        durable = self.durable and self.stage != "server"
        tmp = path.with_name(f".{path.name}.edit")
        with open(tmp, "wb") as f:
            f.write(content)
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)


def _read_back(message: Message) -> tuple[bytes, Envelope]:
    assert message.content_path is not None and message.envelope_path is not None
    content = message.content_path.read_bytes()
    envelope = Envelope.from_bytes(message.envelope_path.read_bytes(), source=str(message.envelope_path))
    return content, envelope
