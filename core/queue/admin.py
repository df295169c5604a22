"""The operator's view of the queue: list, show, retry, delete and bounce spooled messages.

These functions work on the spool directory itself, so they behave the same with or without a
running relay: a change is seen by the relay's queue runner at its next scan. They follow the
runner's own rules for sharing the spool: a ready message is claimed (``.busy``, with its lock)
before it is changed, so the runner never forwards a message while an operator edits it, and a
message the runner is forwarding (``.busy``) is left alone.

``relay queue ...`` (``mailrelay.cli.queue``) and the admin JSON API call these; errors are
:class:`QueueAdminError` subclasses whose message is fit to show to the operator.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Literal

from ..spool import Envelope, EnvelopeError, Spool, SpoolError, is_valid_id
from ..types import Recipient
from .claim import Claim, claim
from .dsn import HEADER_LIMIT, RecipientReport, build_dsn, is_bounce
from .state import Attempt, DeliveryState, load_state, remove_state, save_state, state_path

__all__ = [
    "QueueState", "QUEUE_STATES", "QueueEntry", "MessageDetails", "RetryResult", "BounceResult",
    "QueueAdminError", "InvalidId", "UnknownMessage", "MessageBusy", "UnreadableMessage",
    "list_messages", "show_message", "retry_message", "retry_all", "delete_message", "bounce_message",
    "BOUNCED_REASON",
]

#: ``deferred`` is a ready message whose next attempt (in its ``.retry`` sidecar) is in the future.
QueueState = Literal["ready", "deferred", "busy", "bad"]
QUEUE_STATES: tuple[QueueState, ...] = ("ready", "deferred", "busy", "bad")
BOUNCED_REASON = "bounced by operator"

SpoolState = Literal["ready", "busy", "bad"]
_SPOOL_STATES: tuple[SpoolState, ...] = ("ready", "busy", "bad")
_SPOOL_STATE_OF: dict[QueueState, SpoolState] = {"ready": "ready", "deferred": "ready", "busy": "busy",
                                                 "bad": "bad"}


class QueueAdminError(Exception):
    """An operation on a queued message that cannot be done; the message says why."""


class InvalidId(QueueAdminError):
    """The text given is not a spool message id (it could name a file outside the spool)."""


class UnknownMessage(QueueAdminError):
    """No message with this id is in the spool (any more)."""


class MessageBusy(QueueAdminError):
    """The message is being forwarded right now."""


class UnreadableMessage(QueueAdminError):
    """The message's envelope or content cannot be read."""


@dataclass(frozen=True)
class QueueEntry:
    """One message as ``relay queue list`` shows it.

    ``received`` is when the relay took the message (Unix time); ``size`` the content's size in
    octets; ``next_attempt`` the time of the next forwarding attempt for ``ready`` and
    ``deferred`` messages (at or before now: due; 0 when never tried) and ``None`` for ``busy``
    and ``bad`` ones. ``last_error`` is the last failed attempt's error, else a ``.bad``
    envelope's reason; ``problem`` says what could not be read, if anything.
    """

    id: str
    state: QueueState
    received: float
    size: int
    sender: str
    recipient_count: int
    next_attempt: float | None
    last_error: str
    problem: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class MessageDetails:
    """Everything ``relay queue show`` prints: the entry, the envelope, the delivery history and
    the message's header section (as text; undecodable octets replaced)."""

    entry: QueueEntry
    envelope: Envelope
    attempts: tuple[Attempt, ...]
    delivered: tuple[str, ...]
    headers: str

    def to_dict(self) -> dict[str, Any]:
        e = self.envelope
        return {
            **self.entry.to_dict(),
            "recipients": [{"address": r.address, "local": r.is_local, "mailbox": r.mailbox,
                            "delivered": r.address in self.delivered} for r in e.recipients],
            "delivered": list(self.delivered),
            "client": e.client, "authentication": e.authentication, "content": e.content,
            "forward_to": e.forward_to or e.forward_to_address, "reason": e.reason,
            "reason_code": e.reason_code,
            "attempts": [{"time": a.time, "outcome": a.outcome, "recipients": list(a.recipients),
                          "error": a.error, "destination": a.destination} for a in self.attempts],
            "headers": self.headers,
        }


@dataclass(frozen=True)
class RetryResult:
    """What a retry did to one message: its state before, and whether anything changed."""

    id: str
    was: QueueState
    changed: bool
    previous_next_attempt: float = 0.0


@dataclass(frozen=True)
class BounceResult:
    """``report_id`` is the report's spool id; ``None`` when the sender is the null
    reverse-path and no report was sent. The message is ``.bad`` either way."""

    id: str
    sender: str
    recipients: tuple[str, ...]
    report_id: str | None


# ---------------------------------------------------------------- reading
def list_messages(spool: Spool, states: Iterable[QueueState] | None = None,
                  now: float | None = None) -> list[QueueEntry]:
    """Every ready, busy and bad message, oldest first (``states`` keeps just those)."""
    now = time.time() if now is None else now
    wanted = set(states or QUEUE_STATES)
    entries: list[QueueEntry] = []
    for message_id in _queued_ids(spool):
        try:
            entry = _entry(spool, message_id, now)
        except UnknownMessage:
            continue  # delivered or deleted while we looked
        if entry.state in wanted:
            entries.append(entry)
    return sorted(entries, key=lambda e: (e.received, e.id))


def show_message(spool: Spool, message_id: str, now: float | None = None) -> MessageDetails:
    """One message in full; raises :class:`InvalidId`, :class:`UnknownMessage` or
    :class:`UnreadableMessage`."""
    now = time.time() if now is None else now
    entry = _entry(spool, message_id, now)
    envelope = _parse(spool.envelope_path(message_id, _SPOOL_STATE_OF[entry.state]))
    state = _state(spool, message_id)
    return MessageDetails(entry, envelope, tuple(state.attempts), tuple(state.delivered),
                          _read_headers(spool, message_id))


# ---------------------------------------------------------------- changing
def retry_message(spool: Spool, message_id: str) -> RetryResult:
    """Make a message due now: a deferred one's next attempt becomes 0; a ``.bad`` one goes back
    to the queue without its ``Reason`` (its attempts are kept). Refuses a busy message."""
    spool_state = _locate(spool, message_id)
    if spool_state == "busy":
        raise _busy(message_id)
    if spool_state == "bad":
        return _unfail(spool, message_id)
    claimed = _claim(spool, message_id)
    try:
        state = _state(spool, message_id)
        was: QueueState = "deferred" if state.next_attempt > time.time() else "ready"
        previous = state.next_attempt
        changed = state_path(spool.directory, message_id).exists() and previous != 0.0
        if changed:
            state.next_attempt = 0.0
            save_state(spool.directory, message_id, state)
    finally:
        claimed.release()
    return RetryResult(message_id, was, changed, previous)


def retry_all(spool: Spool) -> tuple[list[RetryResult], list[str]]:
    """Retry every deferred and bad message; return what was retried and the busy ids skipped."""
    done: list[RetryResult] = []
    busy: list[str] = []
    for entry in list_messages(spool):
        if entry.state == "ready":
            continue
        try:
            done.append(retry_message(spool, entry.id))
        except MessageBusy:
            busy.append(entry.id)
        except UnknownMessage:
            continue  # delivered meanwhile
    return done, busy


def delete_message(spool: Spool, message_id: str) -> QueueState:
    """Remove a message's envelope, content and sidecar; return the state it was in.

    The envelope goes first, so the message leaves the queue at once; should the rest fail,
    the relay sweeps content without an envelope at start-up. Refuses a busy message.
    """
    spool_state = _locate(spool, message_id)
    if spool_state == "busy":
        raise _busy(message_id)
    if spool_state == "bad":
        was: QueueState = "bad"
        _unlink(spool.envelope_path(message_id, "bad"))
    else:
        claimed = _claim(spool, message_id)
        try:
            was = "deferred" if _state(spool, message_id).next_attempt > time.time() else "ready"
            _unlink(claimed.busy_path)
        finally:
            claimed.finish()
    _unlink(spool.content_path(message_id))
    remove_state(spool.directory, message_id)
    return was


async def bounce_message(spool: Spool, message_id: str, *, reporting_mta: str,
                         now: float | None = None) -> BounceResult:
    """Return the message to its sender now: one RFC 3464 "failed" report for every recipient
    not yet delivered, queued in ``spool`` with the null sender; then the message becomes
    ``.bad`` with the reason :data:`BOUNCED_REASON`.

    A message from the null reverse-path (itself a report) is only marked bad: a bounce is
    never bounced. A ``.bad`` message can be bounced (a quarantined one, say) unless an
    operator has bounced it already. ``spool`` must be open (the report is committed through
    it) and ``reporting_mta`` is this relay's host name. Refuses a busy message; if the report
    cannot be queued the message is left as it was.
    """
    now = time.time() if now is None else now
    spool_state = _locate(spool, message_id)
    if spool_state == "busy":
        raise _busy(message_id)
    claimed = _claim(spool, message_id) if spool_state == "ready" else None
    path = claimed.busy_path if claimed else spool.envelope_path(message_id, "bad")
    try:
        envelope = _parse(path)
        if envelope.reason.startswith(BOUNCED_REASON):
            raise QueueAdminError(f"{message_id}: already bounced by an operator")
        state = _state(spool, message_id)
        remaining = tuple(r.address for r in envelope.recipients if r.address not in state.delivered)
        report_id: str | None = None
        if is_bounce(envelope.sender):
            reason = f"{BOUNCED_REASON} (no report: the sender is the null reverse-path)"
        elif not remaining:
            reason = f"{BOUNCED_REASON} (no report: every recipient was delivered)"
        else:
            content = _read_prefix(spool.content_path(message_id), message_id)
            report = _report(reporting_mta, envelope.sender, content, remaining, state, message_id, now)
            report_id = spool.new_id()
            report_envelope = Envelope(sender="", recipients=(Recipient(envelope.sender),),
                                       content="7bit" if report.isascii() else "8bit",
                                       utf8_mailbox_names=not envelope.sender.isascii())
            try:
                await spool.write(report_id, report_envelope, [report], commit=True)
            except SpoolError as e:
                raise QueueAdminError(f"{message_id}: could not queue the report: {e}") from None
            reason = BOUNCED_REASON
        _replace_file(path, envelope.with_reason(reason).to_bytes())
        if claimed is not None:
            claimed.mark_bad(spool.envelope_path(message_id, "bad"))
            claimed = None
    finally:
        if claimed is not None:
            claimed.release()
    return BounceResult(message_id, envelope.sender, remaining, report_id)


# ---------------------------------------------------------------- helpers
def _check_id(message_id: str) -> None:
    if not is_valid_id(message_id):
        raise InvalidId(f"{message_id!r} is not a spool message id")


def _queued_ids(spool: Spool) -> set[str]:
    # One directory listing for every state: a message moving between states while we look
    # (ready to busy and back) is still seen once.
    suffixes = [spool.envelope_path("x", s).name[1:] for s in _SPOOL_STATES]  # as the spool names them
    found = set()
    for name in os.listdir(spool.directory):
        for suffix in suffixes:
            if name.endswith(suffix) and is_valid_id(name[: -len(suffix)]):
                found.add(name[: -len(suffix)])
    return found


def _locate(spool: Spool, message_id: str) -> SpoolState:
    """The message's spool state; the id is checked before it names any file."""
    _check_id(message_id)
    for _ in range(2):  # once more if it moved between two looks
        for spool_state in _SPOOL_STATES:
            if spool.envelope_path(message_id, spool_state).exists():
                return spool_state
    if spool.envelope_path(message_id, "new").exists():
        raise UnknownMessage(f"{message_id}: still being received or filtered, not yet queued")
    raise UnknownMessage(f"{message_id}: no such message in {spool.directory}")


def _busy(message_id: str) -> MessageBusy:
    return MessageBusy(f"{message_id}: being forwarded now; try again when the attempt is over")


def _claim(spool: Spool, message_id: str) -> Claim:
    claimed = claim(spool.directory, message_id)
    if claimed is None:  # the runner claimed it first, or it was delivered meanwhile
        if spool.envelope_path(message_id, "busy").exists():
            raise _busy(message_id)
        raise UnknownMessage(f"{message_id}: no such message in {spool.directory}")
    return claimed


def _unfail(spool: Spool, message_id: str) -> RetryResult:
    """E-MailRelay's ``unfail-all`` for one message, plus dropping the reason and the wait."""
    bad = spool.envelope_path(message_id, "bad")
    envelope = _parse(bad)
    # Drop the reason while the message is still bad, so the runner never sees a ready
    # envelope that claims to have failed.
    _replace_file(bad, replace(envelope, reason="", reason_code="").to_bytes())
    if state_path(spool.directory, message_id).exists():
        state = _state(spool, message_id)
        state.next_attempt = 0.0
        save_state(spool.directory, message_id, state)
    try:
        os.rename(bad, spool.envelope_path(message_id, "ready"))
    except FileNotFoundError:
        raise UnknownMessage(f"{message_id}: no such message in {spool.directory}") from None
    return RetryResult(message_id, "bad", True)


def _entry(spool: Spool, message_id: str, now: float) -> QueueEntry:
    for attempt in range(2):  # once more if it moved (ready to busy, say) while we read it
        spool_state = _locate(spool, message_id)
        try:
            envelope: Envelope | None = _parse(spool.envelope_path(message_id, spool_state))
            problem = ""
            break
        except UnknownMessage:
            if attempt:
                raise
        except UnreadableMessage as e:
            envelope, problem = None, str(e)
            break
    content = spool.content_path(message_id)
    try:
        size = content.stat().st_size
    except OSError:
        size = 0
        problem = problem or "content file missing"
    state = _state(spool, message_id)
    next_attempt: float | None = None
    queue_state: QueueState = spool_state
    if spool_state == "ready":
        next_attempt = state.next_attempt
        queue_state = "deferred" if next_attempt > now else "ready"
    last_error = state.last_error or (envelope.reason if envelope else "")
    return QueueEntry(message_id, queue_state, state.received, size,
                      envelope.sender if envelope else "", len(envelope.recipients) if envelope else 0,
                      next_attempt, last_error, problem)


def _state(spool: Spool, message_id: str) -> DeliveryState:
    return load_state(spool.directory, message_id, spool.content_path(message_id))


def _parse(path: Path) -> Envelope:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UnknownMessage(f"{path.name}: no longer in the spool") from None
    except OSError as e:
        raise UnreadableMessage(f"{path}: {e.strerror or e}") from None
    try:
        return Envelope.from_bytes(data, source=str(path))
    except EnvelopeError as e:
        raise UnreadableMessage(str(e)) from None


def _read_prefix(path: Path, message_id: str) -> bytes:
    # One octet past the limit lets build_dsn see that the header section may be cut short.
    try:
        with open(path, "rb") as f:
            return f.read(HEADER_LIMIT + 1)
    except OSError as e:
        raise UnreadableMessage(f"{message_id}: cannot read the content: {e.strerror or e}") from None


def _read_headers(spool: Spool, message_id: str) -> str:
    head = _read_prefix(spool.content_path(message_id), message_id)
    for blank in (b"\r\n\r\n", b"\n\n"):
        end = head.find(blank)
        if end >= 0:
            head = head[:end]
            break
    return head.replace(b"\r\n", b"\n").decode("utf-8", errors="replace")


def _report(reporting_mta: str, sender: str, content: bytes, recipients: tuple[str, ...],
            state: DeliveryState, message_id: str, now: float) -> bytes:
    last_error = state.last_error
    diagnostic = "returned to the sender by the relay's operator" + (
        f"; last error: {last_error}" if last_error else "")
    reports = []
    for address in recipients:
        tried = [a.time for a in state.attempts if address in a.recipients]
        reports.append(RecipientReport(
            recipient=address, action="failed", status="5.0.0", diagnostic=diagnostic,
            last_attempt=datetime.fromtimestamp(max(tried), timezone.utc) if tried else None))
    try:
        return build_dsn(reporting_mta=reporting_mta, sender=sender, original_content=content,
                         reports=reports, arrival_date=datetime.fromtimestamp(state.received, timezone.utc),
                         original_id=message_id, now=datetime.fromtimestamp(now, timezone.utc))
    except ValueError as e:
        raise QueueAdminError(f"{message_id}: cannot build the report: {e}") from None


def _replace_file(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
