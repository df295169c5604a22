"""The queue runner: takes ready messages from the spool and drives them to their destinations.

For each message: claim it (``.busy``), run the client-stage filters, ask ``route`` where each
remote recipient goes, hand each group to ``deliver``, and record the outcome per recipient:
delivered recipients are done; temporary failures are retried on the schedule, for just those
recipients; permanent failures (and expiry) bounce to the sender with an RFC 3464 report, and the
envelope is kept as ``.bad`` with the reason. Every outcome is an ``on_event``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable

from ..message import Message
from ..plugin_host import PluginFailure
from ..spool import Envelope, EnvelopeError, is_valid_id
from ..types import DeliveryResult, Event, FilterAction, Recipient, Route
from .claim import Claim, claim, recover_stale
from .outcome import Outcome, settle
from .schedule import RetryPolicy, parse_duration, parse_schedule
from .state import Attempt, DeliveryState, load_state, remove_state, save_state, state_path

if TYPE_CHECKING:  # pragma: no cover
    from ..relay import Relay

log = logging.getLogger("mailrelay.queue")


@dataclass
class PassSummary:
    """What one pass over the queue did (``--as-client`` turns it into the exit code)."""

    delivered: int = 0
    deferred: int = 0
    failed: int = 0
    ids: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.deferred == 0 and self.failed == 0


class QueueRunner:
    """One per relay; runs only when some plugin implements ``deliver``."""

    def __init__(self, relay: Relay):
        self.relay = relay
        self.settings = relay.settings.queue
        self.spool = relay.spool
        self.hooks = relay.hooks
        self.policy = RetryPolicy(parse_schedule(self.settings.retry), parse_duration(self.settings.max_age))
        self.delay_warning = parse_duration(self.settings.delay_warning) if self.settings.delay_warning else 0.0
        self._event = asyncio.Event()
        self._rescan = False
        self._earliest: float | None = None
        self._inflight: dict[str, asyncio.Task[Outcome]] = {}
        self._slots = asyncio.Semaphore(self.settings.concurrency)
        self._inflight_immediate: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._halted = False

    # ---------------------------------------------------------------- triggers
    def wake(self) -> None:
        """Scan soon (a message was received, a client disconnected, an operator asked)."""
        self._rescan = True
        self._event.set()

    def stop_scanning(self) -> None:
        """A client filter asked (exit 102/104/105): start no more messages until the next trigger."""
        self._halted = True

    def note_deferred(self, when: float) -> None:
        """A message was deferred until ``when``: make sure the runner is awake by then."""
        if self._earliest is None or when < self._earliest:
            self._earliest = when
            self._event.set()

    def start(self) -> None:
        recover_stale(self.spool.directory)
        self._rescan = self.settings.at_start or self.settings.after_receive or self.settings.poll >= 0
        self._task = asyncio.get_running_loop().create_task(self._run(), name="queue-runner")

    async def stop(self, grace: float = 10.0) -> None:
        """Stop scanning; let deliveries in flight finish for ``grace`` seconds, then cancel them
        (their messages go back to the queue untouched)."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._inflight:
            _, pending = await asyncio.wait(list(self._inflight.values()), timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _run(self) -> None:
        # Scan when woken (new mail, a disconnect, the poll interval) or when the earliest
        # deferred message is due; between scans, deferrals only move the alarm.
        poll = self.settings.poll if self.settings.poll > 0 else None
        if self.settings.rescan > 0:
            poll = min(poll, self.settings.rescan) if poll else self.settings.rescan
        while not self._stopping:
            self._event.clear()
            if self._rescan:
                self._rescan = False
                self._earliest = None  # deferrals noted while the scan runs land here too
                due = await self.scan()
                if due is not None:
                    self._earliest = due if self._earliest is None else min(due, self._earliest)
            waits = [poll] if poll else []
            if self._earliest is not None:
                waits.append(self._earliest - time.time())
            try:
                await asyncio.wait_for(self._event.wait(), max(0.0, min(waits)) if waits else None)
            except asyncio.TimeoutError:
                self._rescan = True

    # ---------------------------------------------------------------- passes
    async def scan(self, *, ignore_schedule: bool = False, skip: set[str] | None = None) -> float | None:
        """Start forwarding every due message; return when the next deferred one is due."""
        now = time.time()
        next_due: float | None = None
        self._halted = False
        names = os.listdir(self.spool.directory)
        with_state = {n[: -len(".retry")] for n in names if n.endswith(".retry")}
        for message_id in sorted(n[: -len(".envelope")] for n in names if n.endswith(".envelope")):
            if message_id in self._inflight or (skip and message_id in skip) or not is_valid_id(message_id):
                continue
            content_path = self.spool.content_path(message_id)
            if message_id in with_state:
                state = load_state(self.spool.directory, message_id, content_path)
            else:  # never tried: no sidecar to read; its age is needed only if it is deferred
                state = DeliveryState(received=0.0)
            if state.next_attempt > now and not ignore_schedule:
                next_due = state.next_attempt if next_due is None else min(next_due, state.next_attempt)
                continue
            await self._slots.acquire()
            if self._halted or self._stopping:
                self._slots.release()
                break
            claimed = claim(self.spool.directory, message_id)
            if claimed is None:
                self._slots.release()
                continue
            task = asyncio.get_running_loop().create_task(self._forward_guarded(claimed, state))
            self._inflight[message_id] = task
            task.add_done_callback(lambda _t, m=message_id: self._done(m))
        return next_due

    def _done(self, message_id: str) -> None:
        self._inflight.pop(message_id, None)
        self._slots.release()

    async def run_once(self) -> PassSummary:
        """Forward everything in the spool once, ignoring the retry schedule (``--as-client``).

        Messages that appear during the pass (the bounces it generates) are forwarded too; each
        message is tried at most once, so a deferred one cannot keep the pass going.
        """
        summary = PassSummary()
        tried: set[str] = set()
        while True:
            await self.scan(ignore_schedule=True, skip=tried)
            if not self._inflight:
                return summary
            tried.update(self._inflight)
            for outcome in await asyncio.gather(*self._inflight.values(), return_exceptions=True):
                if isinstance(outcome, Outcome):
                    summary.ids.append(outcome.message_id)
                    if outcome.failed or outcome.unreadable:
                        summary.failed += 1
                    elif outcome.deferred:
                        summary.deferred += 1
                    else:
                        summary.delivered += 1
                else:
                    log.error("forwarding failed: %s", outcome)
                    summary.failed += 1

    # ---------------------------------------------------------------- one message
    async def forward_now(self, message_id: str) -> Outcome | None:
        """``--immediate``: forward a just-committed message while its client waits; ``None`` if
        another worker has it already."""
        claimed = claim(self.spool.directory, message_id)
        if claimed is None:
            return None
        self._inflight_immediate.add(message_id)
        try:
            return await self._forward(claimed, DeliveryState(received=time.time()), immediate=True)
        finally:
            self._inflight_immediate.discard(message_id)

    async def _forward_guarded(self, claimed: Claim, state: DeliveryState) -> Outcome:
        """:meth:`_forward`, but a bug or an I/O error puts the message back, not stuck in ``.busy``."""
        try:
            return await self._forward(claimed, state)
        except asyncio.CancelledError:  # shutdown: the message goes back untouched
            _quietly(claimed.release)
            raise
        except Exception as e:
            log.exception("id=%s forwarding failed unexpectedly; retrying in a minute", claimed.message_id)
            state.next_attempt = time.time() + 60
            _quietly(lambda: self.save(claimed.message_id, state))
            _quietly(claimed.release)
            self.note_deferred(state.next_attempt)
            return Outcome(claimed.message_id, error=str(e), deferred=["?"])

    async def _forward(self, claimed: Claim, state: DeliveryState, immediate: bool = False) -> Outcome:
        message_id = claimed.message_id
        try:
            envelope = Envelope.from_bytes(claimed.busy_path.read_bytes(), source=str(claimed.busy_path))
            content = self.spool.read_content(message_id)
        except (OSError, EnvelopeError) as e:
            log.error("id=%s cannot be read for forwarding: %s", message_id, e)
            claimed.mark_bad(self.spool.envelope_path(message_id, "bad"))
            return Outcome(message_id, failed=[], error=str(e), unreadable=True)
        message = Message(envelope, content, id=message_id, content_path=self.spool.content_path(message_id),
                          envelope_path=claimed.busy_path)
        pending = [r for r in envelope.remote_recipients if r.address not in state.delivered]
        now = time.time()
        if not pending and not envelope.local_recipients:
            log.info("id=%s has no remote recipients left; nothing to forward", message_id)
            return await settle(self, claimed, message, state, delivered=[], deferred=[], failed=[], now=now,
                                immediate=immediate)

        verdict = await self.hooks.filter_chain(message, "client")
        if verdict.stop_scanning:
            self.stop_scanning()
        if verdict.rescan:
            self.wake()
        if message.envelope is not envelope:
            # A filter edited the envelope, perhaps by renaming a new file over the one the claim
            # locks: lock the file that is there now.
            _quietly(claimed.relock)
        if verdict.action is FilterAction.ABANDON:
            # E-MailRelay: the filter has dealt with the message (usually deleted it). What it left
            # goes back to the queue untouched and is looked at again on the next scan.
            if claimed.busy_path.exists():
                state.next_attempt = max(state.next_attempt, now + self.policy.delay_after(1))
                _quietly(lambda: self.save(message_id, state))
                _quietly(claimed.release)
                self.note_deferred(state.next_attempt)
            else:
                claimed.finish()
                _quietly(lambda: remove_state(self.spool.directory, message_id))
            self.hooks.emit(Event("message.abandoned", message_id=message_id))
            return Outcome(message_id)
        envelope = message.envelope  # a client filter may have edited it (ForwardTo, recipients)
        pending = [r for r in envelope.remote_recipients if r.address not in state.delivered]
        if verdict.action is FilterAction.OK and not pending:
            if envelope.local_recipients:
                # E-MailRelay fails a message whose recipients are all local: nothing here can
                # deliver them (deliver: would have), and dropping them would lose the mail.
                local = [DeliveryResult(r, "perm", 550, "5.1.1 local recipient not delivered by any filter")
                         for r in envelope.local_recipients]
                return await self._record(claimed, message, state, local, "", now, immediate)
            return await settle(self, claimed, message, state, delivered=[], deferred=[], failed=[], now=now,
                                immediate=immediate)
        if verdict.action is not FilterAction.OK:
            code = verdict.code or (451 if verdict.action is FilterAction.FAIL else 550)
            result = [DeliveryResult(r, "temp" if code < 500 else "perm", code,
                                     verdict.text or "rejected by client filter") for r in pending]
            return await self._record(claimed, message, state, result, "client filter", now, immediate)

        results: list[DeliveryResult] = []
        for route, recipients in await self._routes(message, pending):
            batch = replace(message, envelope=replace(envelope, recipients=tuple(recipients)))
            results += await self._deliver(route, batch, recipients)
        return await self._record(claimed, message, state, results, "", now, immediate)

    async def _routes(self, message: Message,
                      recipients: list[Recipient]) -> list[tuple[Route | None, list[Recipient]]]:
        """Recipients grouped by route (``None``: nobody knows a route for them)."""
        groups: dict[tuple[str, str], tuple[Route | None, list[Recipient]]] = {}
        # E-MailRelay: ForwardToAddress is where to connect; ForwardTo is a routing hint for a
        # client filter (mx:), used directly only when it names a port (a host:port next hop).
        forward_to = message.envelope.forward_to
        override = message.envelope.forward_to_address or (forward_to if _has_port(forward_to) else "")
        for recipient in recipients:
            route: Route | None
            if override:  # a filter chose the next hop (E-MailRelay's ForwardTo fields)
                route = Route("smarthost", override)
            else:
                try:
                    route = await self.hooks.first("route", message=message, recipient=recipient)
                except PluginFailure as e:
                    log.error("%s", e)
                    route = None
            key = (route.kind, route.destination) if route is not None else ("", "")
            groups.setdefault(key, (route, []))[1].append(recipient)
        return list(groups.values())

    async def _deliver(self, route: Route | None, batch: Message,
                       recipients: list[Recipient]) -> list[DeliveryResult]:
        if route is None:
            return [DeliveryResult(r, "temp", 451, "4.3.5 no route to this recipient (check the routing "
                                   "configuration)") for r in recipients]
        try:
            results = await self.hooks.first("deliver", route=route, batch=[batch])
        except PluginFailure as e:
            log.error("%s", e)
            results = None
            text = f"4.3.0 delivery plugin failed: {e}"
        else:
            text = "4.3.5 no delivery plugin handles this route"
        if not results:
            return [DeliveryResult(r, "temp", 451, text) for r in recipients]
        by_address = {r.recipient.address: r for r in results}
        return [by_address.get(r.address) or DeliveryResult(r, "temp", 451, "4.3.0 no result from delivery")
                for r in recipients]

    async def _record(self, claimed: Claim, message: Message, state: DeliveryState,
                      results: list[DeliveryResult], destination: str, now: float,
                      immediate: bool = False) -> Outcome:
        by_status: dict[str, list[DeliveryResult]] = {"ok": [], "temp": [], "perm": []}
        for result in results:
            by_status[result.status].append(result)
        for status, group in by_status.items():
            if group:
                state.attempts.append(Attempt(now, status, tuple(r.recipient.address for r in group),  # type: ignore[arg-type]
                                              "; ".join(sorted({f"{r.code} {r.text}".strip() for r in group})),
                                              destination))
        return await settle(self, claimed, message, state, delivered=by_status["ok"],
                            deferred=by_status["temp"], failed=by_status["perm"], now=now, immediate=immediate)

    def _remove(self, message_id: str, state: DeliveryState | None = None, claimed: Claim | None = None) -> None:
        """Remove a finished message. With ``claimed`` the files go in the spool's commit thread,
        which drops the claim afterwards (so the ``.busy`` stays locked until it is gone)."""
        paths = [self.spool.envelope_path(message_id, "busy"), self.spool.content_path(message_id)]
        if state is None or state.persisted:
            paths.append(state_path(self.spool.directory, message_id))
        if claimed is not None:
            self.spool.discard(paths, then=claimed.finish)
            return
        for path in paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def save(self, message_id: str, state: DeliveryState) -> None:
        save_state(self.spool.directory, message_id, state)


def _has_port(hostport: str) -> bool:
    host, sep, port = hostport.rpartition(":")
    return bool(sep and host and port.isdigit())


def _quietly(action: Callable[[], object]) -> None:
    try:
        action()
    except OSError as e:
        log.warning("queue clean-up step failed: %s", e)
