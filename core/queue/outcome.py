"""After an attempt: record what happened to each recipient and leave the spool in the right state.

- every recipient delivered: the message's files go;
- some deferred: the envelope keeps just those, and the message waits for its next attempt
  (or, past the maximum age, expires: those recipients fail too);
- some failed permanently: the sender gets one RFC 3464 report for them (never for a bounce), and
  when nothing is left to try the envelope is kept as ``.bad`` with the reason.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from ..message import Message
from ..spool import Envelope, SpoolError
from ..types import DeliveryResult, Event, Recipient
from .claim import Claim
from .dsn import RecipientReport, build_dsn, is_bounce
from .state import DeliveryState, fresh_state

if TYPE_CHECKING:  # pragma: no cover
    from .runner import QueueRunner

log = logging.getLogger("mailrelay.queue")


@dataclass
class Outcome:
    message_id: str
    delivered: list[str] = field(default_factory=list)
    deferred: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    error: str = ""
    unreadable: bool = False
    expired: bool = False
    reply: str = ""  # for --immediate: the next hop's reply when nothing was delivered


_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")


def _status_of(result: DeliveryResult) -> str:
    """The RFC 3463 status from the reply text, else one derived from the reply code."""
    first = result.text.split(" ", 1)[0]
    if _ENHANCED.fullmatch(first) and first[0] == str(result.code)[0]:
        return first
    return f"{result.code // 100 if result.code // 100 in (2, 4, 5) else 5}.0.0"


async def settle(runner: QueueRunner, claimed: Claim, message: Message, state: DeliveryState, *,
                 delivered: list[DeliveryResult], deferred: list[DeliveryResult],
                 failed: list[DeliveryResult], now: float, immediate: bool = False) -> Outcome:
    message_id = message.id
    envelope = message.envelope
    if immediate and not delivered and (deferred or failed):
        # --immediate and nothing got through: the client is still waiting and gets the next
        # hop's reply, so it owns the retry; keeping the message too would deliver it twice.
        first = (failed or deferred)[0]
        runner._remove(message_id, state)
        claimed.finish()
        return Outcome(message_id, deferred=[r.recipient.address for r in deferred],
                       failed=[r.recipient.address for r in failed], reply=f"{first.code} {first.text}")
    outcome = Outcome(message_id, delivered=[r.recipient.address for r in delivered],
                      deferred=[r.recipient.address for r in deferred])
    for result in delivered:
        state.delivered.append(result.recipient.address)
        runner.hooks.emit(Event("message.delivered", message_id=message_id,
                                data={"recipient": result.recipient.address, "reply": f"{result.code} {result.text}"}))

    if (deferred or failed) and not state.received:
        state.received = fresh_state(runner.spool.content_path(message_id)).received
    next_attempt = runner.policy.next_attempt(state.received, state.failures, now) if deferred else None
    if deferred and next_attempt is None:
        outcome.expired = True
        for result in deferred:
            runner.hooks.emit(Event("message.expired", message_id=message_id,
                                    data={"recipient": result.recipient.address, "error": result.text}))
        failed = failed + [replace(r, status="perm", code=r.code,
                                   text=f"4.4.7 message expired after {runner.settings.max_age}; last error: "
                                        f"{r.code} {r.text}") for r in deferred]
        deferred = []
    outcome.failed = [r.recipient.address for r in failed]
    outcome.deferred = [r.recipient.address for r in deferred]

    if failed:
        await _bounce(runner, message, state, failed, "failed", now)
    if deferred:
        assert next_attempt is not None
        if runner.delay_warning and not state.warned_delay and now - state.received >= runner.delay_warning:
            await _bounce(runner, message, state, deferred, "delayed", now,
                          retry_until=state.received + runner.policy.max_age)
            state.warned_delay = True
        remaining = tuple(r.recipient for r in deferred) + envelope.local_recipients
        if remaining != envelope.recipients:
            _rewrite(claimed, replace(envelope, recipients=remaining))
        state.next_attempt = next_attempt
        runner.save(message_id, state)
        claimed.release()
        runner.note_deferred(next_attempt)
        for result in deferred:
            runner.hooks.emit(Event("message.deferred", message_id=message_id,
                                    data={"recipient": result.recipient.address, "error": f"{result.code} {result.text}",
                                          "next_attempt": next_attempt}))
        log.info("id=%s deferred %d recipient(s) until %s: %s", message_id, len(deferred),
                 time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(next_attempt)), deferred[0].text)
    elif failed:
        reason = "; ".join(f"{r.recipient.address}: {r.code} {r.text}" for r in failed)
        bad = replace(envelope, recipients=tuple(r.recipient for r in failed)).with_reason(
            reason[:900], failed[0].code)
        _rewrite(claimed, bad)
        runner.save(message_id, state)
        claimed.mark_bad(runner.spool.envelope_path(message_id, "bad"))
        log.warning("id=%s failed: %s", message_id, reason)
    else:
        runner._remove(message_id, state, claimed)
        if delivered:
            log.info("id=%s delivered to %d recipient(s)", message_id, len(delivered))
    return outcome


def _rewrite(claimed: Claim, envelope: Envelope) -> None:
    # Replace the claimed envelope in place. Not flushed: if a crash undoes it, the worst case
    # is a second delivery to recipients that already have the message.
    tmp = claimed.busy_path.with_name(claimed.busy_path.name + ".tmp")
    tmp.write_bytes(envelope.to_bytes())
    tmp.replace(claimed.busy_path)


async def _bounce(runner: QueueRunner, message: Message, state: DeliveryState, results: list[DeliveryResult],
                  action: str, now: float, retry_until: float | None = None) -> None:
    sender = message.envelope.sender
    if is_bounce(sender):
        log.warning("id=%s: not bouncing a bounce (null reverse-path); %d recipient(s) %s", message.id,
                    len(results), action)
        return
    when = datetime.fromtimestamp(now, timezone.utc)
    reports = [RecipientReport(recipient=r.recipient.address, action=action,  # type: ignore[arg-type]
                               status=_status_of(r), diagnostic=f"{r.code} {r.text}".strip(),
                               last_attempt=when,
                               will_retry_until=datetime.fromtimestamp(retry_until, timezone.utc)
                               if retry_until else None)
               for r in results]
    try:
        content = build_dsn(reporting_mta=runner.relay.domain, sender=sender, original_content=message.content,
                            reports=reports, arrival_date=datetime.fromtimestamp(state.received, timezone.utc),
                            original_id=message.id)
    except ValueError as e:  # e.g. a sender with control characters from a forged spool file
        log.error("id=%s: cannot build a delivery report for %r: %s", message.id, sender, e)
        return
    bounce_id = runner.spool.new_id()
    envelope = Envelope(sender="", recipients=(Recipient(sender),),
                        content="8bit" if not content.isascii() else "7bit",
                        utf8_mailbox_names=not sender.isascii())
    try:
        await runner.spool.write(bounce_id, envelope, [content], commit=True)
    except SpoolError as e:
        log.error("id=%s: could not queue the delivery report for %s: %s", message.id, sender, e)
        return
    for r in results:
        runner.hooks.emit(Event("message.bounced" if action == "failed" else "message.delay-warned",
                                message_id=message.id,
                                data={"recipient": r.recipient.address, "error": f"{r.code} {r.text}",
                                      "report_id": bounce_id}))
    runner.wake()
