"""``relay submit``: E-MailRelay's ``emailrelay-submit``, a message on stdin into the spool.

    relay submit --from app@example.com alice@example.org bob@example.org < message.eml

prints the new message's spool id. Recipients come from the arguments (and ``--to``); without
any, from the message's ``To``, ``Cc`` and ``Bcc`` headers. The sender comes from ``--from``, else
the message's ``Sender``/``From``, else the user's login at the relay's domain. ``Bcc`` headers are
never stored. The spool is found like the daemon finds it (``--spool-dir``, ``--config``,
``$MAILRELAY_CONFIG``, ``/etc/mailrelay/relay.conf``, the per-user default).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, BinaryIO

import click

from ..config import ConfigError
from ..config.settings import Settings
from ..plugin_host import PluginError
from ..submission import (SubmissionError, complete_headers, crlf, envelope_from_headers, local_sender,
                          looks_like_a_message, qualify, strip_fields, submit)
from . import CONFIG_OPTION, load


def settings_for(config: str | None, spool_dir: str | None, parent: dict[str, Any] | None = None) -> Settings:
    """The daemon's settings, so the spool is found exactly as the daemon finds it."""
    parent = parent or {}
    given = dict(parent.get("given", {}))
    if spool_dir:
        given["spool_dir"] = spool_dir
    settings, _, _ = load(config or parent.get("config"), given)
    return settings


def _replace_from(content: bytes, sender: str) -> bytes:
    stripped = strip_fields(content, {"from", "sender"})
    return f"From: {sender or 'anonymous:;'}\r\n".encode() + stripped


@click.command("submit")
@click.argument("recipients", nargs=-1)
@CONFIG_OPTION
@click.option("-s", "--spool-dir", "spool_dir", metavar="DIR", help="spool directory (default: from relay.conf)")
@click.option("-f", "--from", "sender", metavar="ADDRESS", default=None,
              help="envelope sender (default: the message's Sender/From, else LOGIN@DOMAIN; \"\" for <>)")
@click.option("--to", "to", multiple=True, metavar="ADDRESS", help="add an envelope recipient (repeatable)")
@click.option("-x", "--input-file", "input_file", type=click.File("rb"), default=None,
              help="read the message from FILE instead of standard input")
@click.option("-F", "--content-from", "content_from", is_flag=True,
              help="replace the From:/Sender: headers with a From: of the envelope sender")
@click.option("-d", "--content-date", "content_date", is_flag=True, help="add a Date: header if there is none")
@click.option("-I", "--content-message-id", "content_message_id", is_flag=True,
              help="add a Message-ID: header if there is none")
@click.option("-n", "--filename", "filename", is_flag=True, help="print the content file's name, not the id")
@click.option("-v", "--verbose", "verbose", is_flag=True, help="print the content file's full path, not the id")
@click.pass_context
def submit_command(ctx: click.Context, recipients: tuple[str, ...], config: str | None, spool_dir: str | None,
                   sender: str | None, to: tuple[str, ...], input_file: BinaryIO | None, content_from: bool,
                   content_date: bool, content_message_id: bool, filename: bool, verbose: bool) -> None:
    """Write a message (standard input) into the spool for RECIPIENTS; print its spool id.

    The relay need not run: a running relay forwards the message at its next scan of the spool
    ([queue] rescan, or --poll). Address syntax, the size limit and "no recipients" are checked
    as SMTP would; plugin policies and filters run only for mail the daemon receives.
    """
    try:
        settings = settings_for(config, spool_dir, ctx.find_object(dict))
    except (ConfigError, PluginError) as e:
        raise click.ClickException(str(e)) from None
    content = crlf((input_file or sys.stdin.buffer).read())
    if not looks_like_a_message(content):
        raise click.ClickException("the input is not an RFC 5322 message (it must start with a header line)")
    domain = settings.server.effective_domain()
    try:
        from_headers = envelope_from_headers(content, use_return_path=False)
    except SubmissionError as e:
        raise click.ClickException(str(e)) from None
    wanted = [qualify(a, domain) for item in (*to, *recipients) for a in item.split(",") if a.strip()]
    if not wanted:
        wanted = [qualify(a, domain) for a in from_headers.recipients]
    if sender is None:
        sender = from_headers.sender or local_sender(domain)
    sender = "" if sender.strip() in ("", "<>") else qualify(sender, domain)
    content = strip_fields(content, {"bcc"})
    if content_from:
        content = _replace_from(content, sender)
    if content_date or content_message_id:
        content = complete_headers(content, sender=sender, domain=domain, add_from=False,
                                   add_date=content_date, add_message_id=content_message_id)
    try:
        message_id = submit(settings, sender, wanted, content, tool="submit")
    except SubmissionError as e:
        raise click.ClickException(str(e)) from None
    path = Path(settings.spool.dir) / f"{message_id}.content"
    click.echo(str(path.resolve()) if verbose else path.name if filename else message_id)
