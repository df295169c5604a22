"""The queue as the API and the UI show it: ``mailrelay.queue.admin`` plus search, paging and subjects.

Every operation is the one ``relay queue ...`` runs; these helpers only filter and decorate. They
read files (blocking): they run in the HTTP server's worker threads, never on the event loop.
"""

from __future__ import annotations

import email.parser
import email.policy
import time
from dataclasses import dataclass
from typing import Any, Mapping

from mailrelay.queue import admin
from mailrelay.queue.admin import QUEUE_STATES, QueueAdminError, QueueEntry
from mailrelay.queue.schedule import parse_duration
from mailrelay.spool import Spool

MAX_LIMIT = 500
DEFAULT_LIMIT = 50


class BadQuery(ValueError):
    """A query parameter that cannot be used; the message names it."""


@dataclass(frozen=True)
class QueueQuery:
    """``state`` (repeatable or comma-separated), ``sender`` and ``recipient`` (case-insensitive
    substrings), ``min_age``/``max_age`` (durations: 90, 90s, 5m, 2h, 1d), ``limit``, ``offset``."""

    states: tuple[str, ...] = ()
    sender: str = ""
    recipient: str = ""
    min_age: float | None = None
    max_age: float | None = None
    limit: int = DEFAULT_LIMIT
    offset: int = 0

    @classmethod
    def from_args(cls, args: Mapping[str, Any], getlist: Any = None) -> "QueueQuery":
        raw_states = getlist("state") if getlist else [args.get("state", "")]
        states = tuple(s.strip() for value in raw_states for s in str(value or "").split(",") if s.strip())
        unknown = [s for s in states if s not in QUEUE_STATES]
        if unknown:
            raise BadQuery(f"state: {unknown[0]!r} is not one of {', '.join(QUEUE_STATES)}")
        ages = {}
        for key in ("min_age", "max_age"):
            value = str(args.get(key) or "").strip()
            try:
                ages[key] = parse_duration(value) if value else None
            except ValueError as e:
                raise BadQuery(f"{key}: {e}") from None
        limit, offset = _integer(args, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT), _integer(args, "offset", 0, 0, 10**9)
        return cls(states, str(args.get("sender") or "").strip(), str(args.get("recipient") or "").strip(),
                   ages["min_age"], ages["max_age"], limit, offset)


def _integer(args: Mapping[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = str(args.get(key) or "").strip()
    if not value:
        return default
    if not value.isdigit() or not low <= int(value) <= high:
        raise BadQuery(f"{key}: expected a whole number from {low} to {high}")
    return int(value)


def subject_of(headers: str) -> str:
    """The decoded ``Subject`` of a header section ("" if none or unreadable)."""
    try:
        parsed = email.parser.Parser(policy=email.policy.default).parsestr(headers + "\n\n", headersonly=True)
        return str(parsed.get("subject", "") or "")
    except Exception:  # a header the email package cannot decode: show none rather than fail
        return ""


def describe(spool: Spool, entry: QueueEntry, now: float) -> dict[str, Any]:
    """One list row: the entry, its recipients and its subject (what the envelope and headers say)."""
    row = entry.to_dict()
    try:
        details = admin.show_message(spool, entry.id, now)
    except QueueAdminError:  # delivered or changed while we looked: the entry is all we have
        row.update(recipients=[], subject="")
        return row
    row.update(recipients=[r.address for r in details.envelope.recipients], subject=subject_of(details.headers))
    return row


def search(spool: Spool, query: QueueQuery, now: float | None = None) -> tuple[int, list[dict[str, Any]]]:
    """The total number of matching messages and one page of them, oldest first."""
    now = time.time() if now is None else now
    entries = admin.list_messages(spool, query.states or None, now)  # type: ignore[arg-type]
    sender = query.sender.lower()
    entries = [e for e in entries
               if (not sender or sender in e.sender.lower())
               and (query.min_age is None or now - e.received >= query.min_age)
               and (query.max_age is None or now - e.received <= query.max_age)]
    if query.recipient:
        needle = query.recipient.lower()
        rows = [describe(spool, e, now) for e in entries]
        rows = [r for r in rows if any(needle in a.lower() for a in r["recipients"])]
        return len(rows), rows[query.offset: query.offset + query.limit]
    page = entries[query.offset: query.offset + query.limit]
    return len(entries), [describe(spool, e, now) for e in page]


def gauges(spool: Spool, now: float | None = None) -> dict[str, Any]:
    """Messages per state, their total size, and the age of the oldest."""
    now = time.time() if now is None else now
    entries = admin.list_messages(spool, None, now)
    counts = {state: 0 for state in QUEUE_STATES}
    for e in entries:
        counts[e.state] += 1
    oldest = min((e.received for e in entries if e.received), default=None)
    return {**counts, "total": len(entries), "size": sum(e.size for e in entries),
            "oldest_age": round(now - oldest, 3) if oldest is not None else None}
