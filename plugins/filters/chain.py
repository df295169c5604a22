"""Run one stage's filters in order, keeping the message and its spool files in step.

After each filter the in-memory message matches the files: content a filter returns is written to
the content file (atomically and durably once the message is published, at the client stage), and
after a filter that edits the files itself they are read back. Every run emits ``filter.done``.
A filter that raises, overruns or answers nonsense is a temporary failure, never a lost message.
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
        for spec, flt in self.filters:
            started = time.perf_counter()
            result = await self._run_one(spec, flt, message)
            if result.action is FilterAction.OK:
                problem = await self._sync(flt, result, message)
                if problem is not None:
                    result = problem
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

    async def _sync(self, flt: Any, result: FilterResult, message: Message) -> FilterResult | None:
        """Bring the message and the files into agreement after a filter said OK."""
        try:
            if result.content is not None:
                await asyncio.to_thread(self._write_content, message, result.content)
                message.replace_content(result.content)
            elif getattr(flt, "edits_files", False):
                content, envelope = await asyncio.to_thread(_read_back, message)
                if content != message.content:
                    message.replace_content(content)
                message.envelope = envelope
        except FileNotFoundError:
            log.error("id=%s filter=%s said ok but the message files are gone (a filter that deletes "
                      "the message should exit 100)", message.id, flt.name)
            return FilterResult.fail(TEMPFAIL, 451, "4.3.0", reason="message files disappeared")
        except (OSError, ValueError) as e:
            log.error("id=%s after filter=%s the message cannot be read back: %s", message.id, flt.name, e)
            return FilterResult.fail(TEMPFAIL, 451, "4.3.0", reason=f"unreadable after filter: {e}")
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
            fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _read_back(message: Message) -> tuple[bytes, Envelope]:
    assert message.content_path is not None and message.envelope_path is not None
    content = message.content_path.read_bytes()
    envelope = Envelope.from_bytes(message.envelope_path.read_bytes(), source=str(message.envelope_path))
    return content, envelope
