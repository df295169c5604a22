"""Recent relay events for the API, the dashboard and the Server-Sent Events stream.

``on_event`` runs in the relay's event loop; readers are the HTTP server's worker threads. So the
log is a bounded deque behind a lock, with a condition variable that wakes stream readers, and a
sequence number per event that a reconnecting ``EventSource`` hands back as ``Last-Event-ID``.
"""

from __future__ import annotations

import collections
import json
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator

from mailrelay_sdk import Event

#: How often an idle stream sends a comment line, so proxies and clients see it is alive.
KEEPALIVE = 15.0


@dataclass(frozen=True)
class LoggedEvent:
    """An event with its position in this relay's sequence."""

    seq: int
    event: Event

    def to_dict(self) -> dict[str, Any]:
        e = self.event
        return {"seq": self.seq, "name": e.name, "time": e.time, "message_id": e.message_id,
                "session_id": e.session_id, "data": dict(e.data)}


class EventLog:
    """The last ``size`` events, counters per event name since start-up, and waiting readers."""

    def __init__(self, size: int) -> None:
        self._events: collections.deque[LoggedEvent] = collections.deque(maxlen=size)
        self._counts: collections.Counter[str] = collections.Counter()
        self._seq = 0
        self._condition = threading.Condition()
        self._closed = False
        self.started = time.time()

    def add(self, event: Event) -> None:
        with self._condition:
            self._seq += 1
            self._events.append(LoggedEvent(self._seq, event))
            self._counts[event.name] += 1
            self._condition.notify_all()

    def close(self) -> None:
        """The server is stopping: every stream ends."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def counts(self) -> dict[str, int]:
        with self._condition:
            return dict(self._counts)

    def recent(self, since: int = 0, limit: int = 100, names: set[str] | None = None) -> list[LoggedEvent]:
        """Events after sequence number ``since`` (oldest first), at most the last ``limit``."""
        with self._condition:
            found = [e for e in self._events if e.seq > since and (not names or e.event.name in names)]
        return found[-limit:] if limit else []

    def stream(self, since: int, keepalive: float = KEEPALIVE) -> Iterator[str]:
        """Server-Sent Events text: each event after ``since`` as it happens, a comment line every
        ``keepalive`` seconds, until :meth:`close`."""
        yield "retry: 3000\n\n"
        last = since
        while True:
            with self._condition:
                pending = [e for e in self._events if e.seq > last]
                if not pending and not self._closed:
                    self._condition.wait(keepalive)
                    pending = [e for e in self._events if e.seq > last]
                closed = self._closed
            for logged in pending:
                last = logged.seq
                name = logged.event.name.replace("\r", " ").replace("\n", " ")  # one field line
                yield (f"id: {logged.seq}\nevent: {name}\n"
                       f"data: {json.dumps(logged.to_dict(), default=str)}\n\n")
            if closed:
                return
            if not pending:
                yield ": keep-alive\n\n"
