"""``relay queue``: the operator's commands for the spool (list, show, retry, delete, bounce).

They work on the spool directory directly, with or without a running relay; a running relay
sees the change at its next scan of the spool. Each takes ``--spool-dir`` or ``--config`` like
the daemon. The operations themselves live in :mod:`mailrelay.queue.admin`.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any, Callable, cast

import click

from ..config.settings import Settings
from ..queue import admin
from ..queue.admin import QUEUE_STATES, MessageDetails, QueueAdminError, QueueEntry
from ..queue.dsn import is_bounce
from ..spool import Spool
from . import CONFIG_OPTION, command_settings

_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
_ERROR_WIDTH = 60


def _spool_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("-s", "--spool-dir", "spool_dir", metavar="DIR", default=None,
                     help="spool directory (default: from relay.conf)")(f)
    return CONFIG_OPTION(f)


def _settings(ctx: click.Context, config: str | None, spool_dir: str | None) -> Settings:
    """The daemon's settings, so the spool directory is found exactly as the daemon finds it."""
    settings = command_settings(ctx, config, spool_dir)
    if not Path(settings.spool.dir).is_dir():
        raise click.ClickException(f"spool directory {settings.spool.dir} does not exist")
    return settings


def _spool(settings: Settings) -> Spool:
    return Spool(settings.spool.dir, durable=settings.spool.durability == "fsync",
                 sync_method=settings.spool.sync_method)


def _run(operation: Callable[[], Any]) -> Any:
    """Run an admin operation; its errors (and the file system's) become exit status 1."""
    try:
        return operation()
    except QueueAdminError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(f"{e.filename or 'spool'}: {e.strerror or e}") from None


@click.group("queue")
def queue_group() -> None:
    """Inspect and manage the messages in the spool.

    These work with or without a running relay; a running relay sees a change at its next scan
    of the spool (with --poll, or when mail arrives).
    """


@queue_group.command("list")
@_spool_options
@click.option("--state", "states", multiple=True, type=click.Choice(QUEUE_STATES),
              help="only messages in this state (repeatable)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_context
def list_command(ctx: click.Context, config: str | None, spool_dir: str | None,
                 states: tuple[str, ...], as_json: bool) -> None:
    """List the messages in the spool, oldest first.

    One line each: id, state, age, size, sender, recipient count, next attempt, last error.
    States: ready, deferred (waiting for a retry), busy (being forwarded), bad (failed).
    """
    spool = _spool(_settings(ctx, config, spool_dir))
    now = time.time()
    wanted = cast("tuple[admin.QueueState, ...]", states) or None
    entries: list[QueueEntry] = _run(lambda: admin.list_messages(spool, wanted, now))
    if as_json:
        click.echo(json.dumps([e.to_dict() for e in entries], indent=2))
        return
    if not entries:
        only = f" (state {', '.join(states)})" if states else ""
        click.echo(f"no messages{only} in {spool.directory}")
        return
    rows = [(e.id, e.state, _duration(now - e.received), _size(e.size), _printable(e.sender or "<>"),
             str(e.recipient_count), _next(e, now), _truncate(_printable(e.problem or e.last_error)))
            for e in entries]
    header = ("ID", "STATE", "AGE", "SIZE", "SENDER", "RCPTS", "NEXT", "LAST ERROR")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])


@queue_group.command("show")
@_spool_options
@click.argument("message_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_context
def show_command(ctx: click.Context, config: str | None, spool_dir: str | None, message_id: str,
                 as_json: bool) -> None:
    """Show one message: envelope, attempts, headers.

    The envelope's fields, every delivery attempt, when the next one is due, and the
    message's header section (never its body).
    """
    spool = _spool(_settings(ctx, config, spool_dir))
    now = time.time()
    details: MessageDetails = _run(lambda: admin.show_message(spool, message_id, now))
    if as_json:
        click.echo(json.dumps(details.to_dict(), indent=2))
        return
    entry, envelope = details.entry, details.envelope
    lines = [_field("id", entry.id), _field("state", entry.state),
             _field("received", _when(entry.received, now)), _field("size", f"{entry.size} octets"),
             _field("sender", _printable(envelope.sender) or "<> (null reverse-path: a delivery report)")]
    for r in envelope.recipients:
        kind = f"local, mailbox {r.mailbox}" if r.is_local else "remote"
        lines.append(_field("recipient", f"{_printable(r.address)} ({_printable(kind)})"))
    lines += [_field("delivered", _printable(address)) for address in details.delivered]
    lines += [_field("client", _printable(envelope.client) or "-"),
              _field("auth", _printable(envelope.authentication) or "-")]
    if envelope.forward_to or envelope.forward_to_address:
        lines.append(_field("forward to", _printable(envelope.forward_to_address or envelope.forward_to)))
    if envelope.reason:
        lines.append(_field("reason", _printable(envelope.reason)
                            + (f" ({envelope.reason_code})" if envelope.reason_code else "")))
    if entry.problem:
        lines.append(_field("problem", _printable(entry.problem)))
    lines.append(_field("attempts", str(len(details.attempts) or "none")))
    for a in details.attempts:
        where = f" via {_printable(a.destination)}" if a.destination else ""
        lines.append(f"  {_clock(a.time)}  {a.outcome:<4}  {_printable(', '.join(a.recipients))}{where}"
                     + (f": {_printable(a.error)}" if a.error else ""))
    lines.append(_field("next attempt", _next(entry, now, long=True)))
    lines.append("headers:")
    lines += [f"  {_printable(line)}" for line in details.headers.split("\n")]
    click.echo("\n".join(lines))


@queue_group.command("retry")
@_spool_options
@click.argument("message_id", metavar="ID", required=False)
@click.option("--all", "retry_everything", is_flag=True, help="every deferred and bad message")
@click.pass_context
def retry_command(ctx: click.Context, config: str | None, spool_dir: str | None, message_id: str | None,
                  retry_everything: bool) -> None:
    """Make a message (or every one) due now.

    A deferred message is tried at the relay's next scan; a bad one goes back to the queue (its
    reason removed, its attempts kept). A message being forwarded is refused.
    """
    if bool(message_id) == retry_everything:
        raise click.UsageError("give either a message ID or --all")
    spool = _spool(_settings(ctx, config, spool_dir))
    if message_id:
        result: admin.RetryResult = _run(lambda: admin.retry_message(spool, message_id))
        if result.was == "bad":
            click.echo(f"{message_id}: moved from bad back to the queue; due now")
        elif result.was == "deferred":
            click.echo(f"{message_id}: was deferred until {_clock(result.previous_next_attempt)}; due now")
        else:
            click.echo(f"{message_id}: already due; it goes at the next scan")
        return
    done, busy = _run(lambda: admin.retry_all(spool))
    counts = {state: sum(1 for r in done if r.was == state) for state in ("deferred", "bad")}
    summary = (f"retried {len(done)} message(s): {counts['deferred']} deferred, {counts['bad']} bad"
               if done else "nothing to retry")
    click.echo(summary + (f"; {len(busy)} being forwarded now, left alone" if busy else ""))


@queue_group.command("delete")
@_spool_options
@click.argument("message_id", metavar="ID")
@click.pass_context
def delete_command(ctx: click.Context, config: str | None, spool_dir: str | None, message_id: str) -> None:
    """Remove a message without telling its sender.

    Its content, envelope and delivery state go. A message being forwarded is refused.
    """
    spool = _spool(_settings(ctx, config, spool_dir))
    was = _run(lambda: admin.delete_message(spool, message_id))
    click.echo(f"{message_id}: deleted (was {was})")


@queue_group.command("bounce")
@_spool_options
@click.argument("message_id", metavar="ID")
@click.option("-D", "--domain", metavar="FQDN", default=None,
              help="host name the report comes from (default: the relay's domain)")
@click.pass_context
def bounce_command(ctx: click.Context, config: str | None, spool_dir: str | None, message_id: str,
                   domain: str | None) -> None:
    """Return a message to its sender now.

    The sender gets one failure report (RFC 3464) for every recipient not yet delivered, and
    the message is kept as bad. A message from the null sender (a report itself) is only
    marked bad. A message being forwarded is refused.
    """
    settings = _settings(ctx, config, spool_dir)
    spool = _spool(settings)
    reporting_mta = domain or settings.server.effective_domain()

    async def bounce() -> admin.BounceResult:
        spool.open()
        try:
            return await admin.bounce_message(spool, message_id, reporting_mta=reporting_mta)
        finally:
            spool.close()

    result: admin.BounceResult = _run(lambda: asyncio.run(bounce()))
    if result.report_id is None:
        why = ("the sender is the null reverse-path (it is a report itself)" if is_bounce(result.sender)
               else "every recipient was delivered")
        click.echo(f"{message_id}: not reported: {why}; marked bad")
    else:
        click.echo(f"{message_id}: report to <{_printable(result.sender)}> for {len(result.recipients)} "
                   f"recipient(s) queued as {result.report_id}; marked bad")


# ---------------------------------------------------------------- formatting
def _field(label: str, value: str) -> str:
    return f"{label + ':':<14}{value}"


def _printable(text: str) -> str:
    """One line with no terminal control characters (addresses and replies come from outside)."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _truncate(text: str, width: int = _ERROR_WIDTH) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size, smaller, smaller_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60),
                                              ("m", 60, "s", 1)):
        if seconds >= size:
            rest = (seconds % size) // smaller_size
            return f"{seconds // size}{unit}" + (f"{rest}{smaller}" if rest else "")
    return f"{seconds}s"


def _size(octets: int) -> str:
    for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
        if octets >= size:
            return f"{octets / size:.1f}{unit}"
    return str(octets)


def _clock(when: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))


def _when(when: float, now: float) -> str:
    delta = when - now
    relative = f"in {_duration(delta)}" if delta > 0 else f"{_duration(-delta)} ago"
    return f"{_clock(when)} ({relative})"


def _next(entry: QueueEntry, now: float, long: bool = False) -> str:
    if entry.state == "busy":
        return "being forwarded now" if long else "now"
    if entry.next_attempt is None:
        return "never (bad: see `relay queue retry`)" if long else "-"
    if entry.next_attempt <= now:
        return "due now (at the next scan)" if long else "due"
    return _when(entry.next_attempt, now) if long else f"in {_duration(entry.next_attempt - now)}"
