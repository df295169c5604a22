"""Sending one webhook's outbox: signed POSTs, retries with capped exponential back-off, age limit.

Each event has its own back-off (``retry_initial``, doubling up to ``retry_max``); on top of that a
failure pauses the whole endpoint for the back-off of its current run of failures, so an endpoint
that is down costs one attempt per interval, not one per waiting event. Outcomes:

* 2xx: done, the outbox file goes;
* 4xx other than 408 and 429: the endpoint refuses this event for good (logged, file removed);
* anything else (3xx, 408, 429, 5xx, no connection, time-out, TLS failure): try again later,
  honouring ``Retry-After`` (in seconds, capped at ``retry_max``), until ``max_age`` has passed
  since the event happened; then it is dropped with a log line.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import hmac
import json
import logging
import random
import ssl
import time
from dataclasses import dataclass, field
from datetime import datetime

from .http import Endpoint, HttpError, post
from .outbox import Outbox
from .settings import WebhookSettings

log = logging.getLogger("mailrelay.webhooks")

USER_AGENT = "mailrelay-webhooks/1"
STOP_GRACE = 5.0  # seconds a POST in flight at shutdown may take to finish (else it is sent again later)


@dataclass(order=True)
class Pending:
    """An event waiting in one webhook's outbox (the body stays on disk until it is sent)."""

    next_attempt: float
    event_id: str
    attempts: int = field(default=0, compare=False)
    happened: float | None = field(default=None, compare=False)  # the event's time, once read


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """``X-Relay-Signature``: hex HMAC-SHA256 of ``timestamp + "." + body`` keyed with the secret."""
    return hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


class HookSender:
    """The worker tasks of one ``[webhooks.NAME]``."""

    def __init__(self, name: str, settings: WebhookSettings, endpoint: Endpoint, outbox: Outbox,
                 tls: ssl.SSLContext | None):
        self.name = name
        self.settings = settings
        self.endpoint = endpoint
        self.outbox = outbox
        self.tls = tls
        self._queue: list[Pending] = []
        self._wake = asyncio.Event()
        self._paused_until = 0.0
        self._failures_in_a_row = 0
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._in_flight: set[asyncio.Task[None]] = set()

    def add(self, event_id: str, attempts: int = 0, when: float = 0.0) -> None:
        """Queue an event whose outbox file exists."""
        heapq.heappush(self._queue, Pending(when, event_id, attempts))
        self._wake.set()

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._work(), name=f"webhook-{self.name}-{i}")
                       for i in range(self.settings.concurrency)]

    async def stop(self) -> None:
        """Take nothing new; let POSTs in flight finish (up to a grace period), then cancel."""
        self._stopping = True
        self._wake.set()
        if self._in_flight:
            await asyncio.wait(list(self._in_flight), timeout=STOP_GRACE)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    def backoff(self, failures: int) -> float:
        """Seconds before the next try after ``failures`` failures in a row (±10% jitter)."""
        base = self.settings.retry_initial_seconds * 2 ** min(max(failures, 1) - 1, 32)
        return min(base, self.settings.retry_max_seconds) * random.uniform(0.9, 1.1)

    async def _next(self) -> Pending | None:
        while not self._stopping:
            now = time.time()
            wait: float | None = None
            if self._queue:
                due = max(self._queue[0].next_attempt, self._paused_until)
                if due <= now:
                    return heapq.heappop(self._queue)
                wait = due - now
            self._wake.clear()
            try:
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            except TimeoutError:
                pass
        return None

    async def _work(self) -> None:
        while (pending := await self._next()) is not None:
            # The attempt runs as its own task so that stop() can let it finish rather than cut
            # it off between the endpoint's 2xx and the removal of the file.
            attempt = asyncio.get_running_loop().create_task(self._attempt(pending))
            self._in_flight.add(attempt)
            attempt.add_done_callback(self._in_flight.discard)
            try:
                await asyncio.shield(attempt)
            except asyncio.CancelledError:
                if not attempt.done():
                    attempt.cancel()
                raise
            except Exception:  # a bug: keep the event and the worker
                log.exception("webhook=%s event=%s unexpected error", self.name, pending.event_id)
                self._retry(pending, "internal error", None)

    async def _attempt(self, pending: Pending) -> None:
        body = await self.outbox.read(self.name, pending.event_id)
        if body is None:
            return
        try:
            payload = json.loads(body)
            happened = datetime.fromisoformat(payload["time"]).timestamp()
        except (ValueError, KeyError, TypeError):
            log.error("webhook=%s event=%s unreadable outbox file %s; dropped", self.name, pending.event_id,
                      self.outbox.path(self.name, pending.event_id))
            self.outbox.remove(self.name, pending.event_id)
            return
        pending.happened = happened
        if self._too_old(pending, happened, time.time()):
            return
        timestamp = str(int(time.time()))
        headers = {"User-Agent": USER_AGENT, "Content-Type": "application/json",
                   "X-Relay-Event-Id": pending.event_id, "X-Relay-Timestamp": timestamp,
                   "X-Relay-Signature": sign(self.settings.secret, timestamp, body)}
        pending.attempts += 1
        try:
            response = await post(self.endpoint, body, headers, timeout=self.settings.timeout, tls=self.tls)
        except HttpError as e:
            self._retry(pending, str(e), None)
            return
        status = response.status
        if 200 <= status < 300:
            self._failures_in_a_row = 0
            self._paused_until = 0.0
            self.outbox.remove(self.name, pending.event_id)
            log.info("webhook=%s event=%s name=%s id=%s delivered status=%d attempts=%d", self.name,
                     pending.event_id, payload.get("event", ""), payload.get("message_id") or "-", status,
                     pending.attempts)
        elif 400 <= status < 500 and status not in (408, 429):
            self.outbox.remove(self.name, pending.event_id)
            log.error("webhook=%s event=%s url=%s refused permanently: %d %s; dropped", self.name,
                      pending.event_id, self.endpoint.redacted, status, response.reason)
        else:
            self._retry(pending, f"{status} {response.reason}".strip(), response.headers.get("retry-after"))

    def _retry(self, pending: Pending, error: str, retry_after: str | None) -> None:
        now = time.time()
        self._failures_in_a_row += 1
        delay = self.backoff(pending.attempts)
        pause = self.backoff(self._failures_in_a_row)
        if retry_after and retry_after.strip().isdigit():
            delay = pause = min(float(retry_after), self.settings.retry_max_seconds)
        self._paused_until = max(self._paused_until, now + pause)
        pending.next_attempt = now + delay
        if pending.happened is not None and self._too_old(pending, pending.happened, pending.next_attempt, error):
            return
        log.warning("webhook=%s event=%s url=%s attempt %d failed: %s; next in %.1fs", self.name,
                    pending.event_id, self.endpoint.redacted, pending.attempts, error, delay)
        if not self._stopping:
            self.add(pending.event_id, pending.attempts, pending.next_attempt)

    def _too_old(self, pending: Pending, happened: float, at: float, error: str = "") -> bool:
        """Past ``max_age`` at time ``at``: drop the event (logged) and say so."""
        if at - happened <= self.settings.max_age_seconds:
            return False
        self.outbox.remove(self.name, pending.event_id)
        log.error("webhook=%s event=%s url=%s dropped: not delivered within max_age %s after %d attempt(s)%s",
                  self.name, pending.event_id, self.endpoint.redacted, self.settings.max_age, pending.attempts,
                  f"; last error: {error}" if error else "")
        return True
