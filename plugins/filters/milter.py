"""``filter-milter``: ``milter:host:port`` and ``milter:unix:/path``, any Sendmail milter as a filter.

The relay plays the MTA's part of the milter protocol (``milter_protocol``, version 6) over one
connection per message: the client's real address (after the PROXY protocol) and HELO, the
envelope with its ESMTP parameters, the headers, the body in 64 KiB chunks, the end of the
message, and the macros milters look at (``j``, ``{daemon_name}``, ``i``, ``{client_addr}``,
``{auth_authen}``, ``{mail_addr}``, ``{rcpt_addr}``...). At the client stage the envelope is all
there is: no HELO, the client address from the envelope's ``Client`` field.

What the milter decides becomes the filter's answer: accept or continue (ok), reject (550
``5.7.1 Command rejected``, or the milter's own reply and text; a 4xx reply is a temporary
failure), tempfail (``451 4.7.1``), discard (abandon: the client gets 250, the message is
dropped). A recipient the milter refuses refuses the message: RCPT was acknowledged before the
filters ran, and dropping one recipient silently would lose mail without telling anyone.
Quarantine holds the message as a ``.bad`` envelope with ``Reason: quarantined: ...`` (what
``relay queue`` shows, and what an ``on_receive`` quarantine does).

Edits at the end of the message change the spooled files: header and body edits through the
filter's returned content (the chain writes it atomically), sender and recipient changes by
rewriting the envelope file atomically (fsynced at the client stage, where the message is
already published). Header indexes follow Sendmail and Postfix: the relay's own ``Received:``
line is not shown to the milter, ``change header`` counts from 1 among the headers of that name
the milter saw (an empty value deletes; a missing one is appended), ``insert header`` counts
from 0 at the very top.

A milter that cannot be reached, breaks the protocol, closes the connection or does not finish
within ``--filter-timeout`` is a temporary failure (451; a retry later at the client stage),
unless ``[milter] on_error = "accept"``.

    [milter]
    on_error = "tempfail"       # or "accept": pass the message on unfiltered (logged)
    daemon_name = "mailrelay"   # the {daemon_name} macro (OpenDKIM's MTA list, rspamd settings)
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import re
from dataclasses import dataclass, replace
from typing import Any, Callable, Literal

from mailrelay_sdk import Envelope, FilterResult, Message, Recipient, hookimpl

from mailrelay import __version__
from mailrelay.filtering import FilterSpec, FilterSpecError

from . import milter_protocol as mp
from .mailbox import fsync_dir, remove_message, replace_file
from .net import TEMPFAIL, Address, parse_address, printable

log = logging.getLogger("mailrelay.filters")

_FIELD = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")
_PREFIXES = ("unix:", "local:", "inet6:", "inet:", "tcp:")


@dataclass
class MilterSettings:
    on_error: Literal["tempfail", "accept"] = "tempfail"  # milter down, slow or confused
    daemon_name: str = "mailrelay"                        # the {daemon_name} macro


def parse_milter_address(argument: str, spec_text: str) -> Address:
    """``host:port``, ``[ipv6]:port``, ``inet:host:port``, Sendmail's ``inet:port@host``,
    ``unix:/path``, ``local:/path`` or ``/path``."""
    text = argument.strip()
    prefix = next((p for p in _PREFIXES if text.startswith(p)), "")
    text = text[len(prefix):]
    if prefix in ("unix:", "local:") or text.startswith("/"):
        if not text.startswith("/"):
            raise FilterSpecError(f"{spec_text!r}: a unix socket needs an absolute path")
        return Address(path=text)
    port, at, host = text.partition("@")
    if at and port.isdigit():
        text = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return parse_address(text, spec_text)


# ---------------------------------------------------------------- the message, as milters see it
class Content:
    """The header fields of a message (each with its CRLF) and the rest (blank line and body)."""

    def __init__(self, content: bytes, message_id: str):
        self.fields: list[tuple[bytes, bool]] = []  # (raw field, is the relay's own Received:)
        pos = 0
        while pos < len(content):
            end = content.find(b"\n", pos)
            end = len(content) if end < 0 else end + 1
            line = content[pos:end]
            if line[:1] in (b" ", b"\t") and self.fields:
                self.fields[-1] = (self.fields[-1][0] + line, False)
            elif _FIELD.match(line):
                self.fields.append((line, False))
            else:
                break
            pos = end
        self.rest = content[pos:]
        if self.fields and message_id and _is_ours(self.fields[0][0], message_id):
            self.fields[0] = (self.fields[0][0], True)  # shown to no milter, as Postfix does

    @property
    def body(self) -> bytes:
        for separator in (b"\r\n", b"\n"):
            if self.rest.startswith(separator):
                return self.rest[len(separator):]
        return self.rest

    def visible(self) -> tuple[tuple[bytes, bytes], ...]:
        """(name, raw value) of each header field a milter is shown."""
        out = []
        for raw, ours in self.fields:
            if not ours:
                name, _, value = raw.partition(b":")
                out.append((name.rstrip(b" \t"), value.rstrip(b"\r\n")))
        return tuple(out)

    def apply(self, edit: mp.Edit) -> None:
        line = edit.line + b"\r\n" if edit.line else b""
        if edit.kind == "add_header":
            self.fields.append((line, False))
        elif edit.kind == "insert_header":
            self.fields.insert(min(edit.index, len(self.fields)), (line, False))
        elif edit.kind == "change_header":
            wanted = edit.name.lower()
            seen = 0
            for i, (raw, ours) in enumerate(self.fields):
                if not ours and raw.partition(b":")[0].rstrip(b" \t").lower() == wanted:
                    seen += 1
                    if seen == edit.index:
                        if line:
                            self.fields[i] = (line, False)
                        else:
                            del self.fields[i]
                        return
            if line:  # Sendmail 8.13 and Postfix add a header that is not there to change
                self.fields.append((line, False))
        elif edit.kind == "replace_body":
            body = edit.value.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            if body and not body.endswith(b"\r\n"):
                body += b"\r\n"
            self.rest = b"\r\n" + body

    def to_bytes(self) -> bytes:
        return b"".join(raw for raw, _ in self.fields) + self.rest


def _is_ours(field: bytes, message_id: str) -> bool:
    return (field[:9].lower() == b"received:"
            and re.search(rb"\bid " + re.escape(message_id.encode()) + rb"(?![\w.])", field) is not None)


def edit_envelope(envelope: Envelope, edits: list[mp.Edit]) -> Envelope:
    """The envelope after the milter's sender and recipient changes (in the order asked)."""
    sender = envelope.sender
    recipients = list(envelope.recipients)
    for edit in edits:
        if edit.kind == "change_from":
            sender = edit.address
        elif edit.kind == "add_rcpt":
            if not any(r.address.lower() == edit.address.lower() for r in recipients):
                recipients.append(Recipient(edit.address))
        elif edit.kind == "delete_rcpt":
            recipients = [r for r in recipients if r.address.lower() != edit.address.lower()]
    utf8 = envelope.utf8_mailbox_names or not (sender.isascii() and all(r.address.isascii() for r in recipients))
    return replace(envelope, sender=sender, recipients=tuple(recipients), utf8_mailbox_names=utf8)


def _family(ip: str) -> tuple[str, str]:
    try:
        address = ipaddress.ip_address(ip.split("%")[0])
    except ValueError:
        return "U", ""
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address.version), str(address)


def build_request(message: Message, content: Content, *, domain: str, daemon_name: str) -> mp.MilterRequest:
    """What the milter is told: the session (server stage) or the envelope (client stage)."""
    envelope, session, transaction = message.envelope, message.session, message.transaction
    family, address = _family(session.peer_ip if session is not None else envelope.client)
    port = session.peer_port if session is not None and family != "U" else 0
    name = f"[{address}]" if address else "unknown"
    connect = {"j": domain, "{daemon_name}": daemon_name, "v": f"mailrelay {__version__}",
               "{client_name}": name, "{client_addr}": address, "{client_port}": str(port)}
    if session is not None and session.local_ip:
        connect |= {"{daemon_addr}": session.local_ip, "{daemon_port}": str(session.local_port)}
    helo: dict[str, str] = {}
    if session is not None and session.tls:
        helo["{cipher}"] = session.tls_cipher
    mail = {"i": message.id, "{mail_addr}": envelope.sender, "{mail_host}": envelope.sender.rpartition("@")[2],
            "{mail_mailer}": "esmtp"}
    if envelope.authentication:
        mail["{auth_authen}"] = envelope.authentication
        if session is not None and session.auth_mechanism:  # the client stage does not know it
            mail["{auth_type}"] = session.auth_mechanism
    args = []
    if transaction is not None and transaction.size_hint:
        args.append(f"SIZE={transaction.size_hint}")
    if envelope.content == "8bit":
        args.append("BODY=8BITMIME")
    if (transaction is not None and transaction.smtputf8) or envelope.utf8_mailbox_names:
        args.append("SMTPUTF8")
    rcpt_macros = tuple({"{rcpt_addr}": r.address, "{rcpt_host}": r.domain,
                         "{rcpt_mailer}": "local" if r.is_local else "esmtp"} for r in envelope.recipients)
    queue_id = {"i": message.id}
    return mp.MilterRequest(
        client_name=name, family=family, client_port=port, client_address=address,
        helo=session.helo if session is not None else "", sender=envelope.sender, sender_args=tuple(args),
        recipients=tuple(r.address for r in envelope.recipients), headers=content.visible(), body=content.body,
        macros={mp.CONNECT: connect, mp.HELO: helo, mp.MAIL: mail, mp.DATA: queue_id, mp.EOH: queue_id,
                mp.EOM: queue_id},
        rcpt_macros=rcpt_macros)


# ---------------------------------------------------------------- the filter
class MilterFilter:
    """``milter:ADDRESS``: one milter conversation per message."""

    # Reads message.content and message.envelope, never the files; writes only the envelope file
    # (and message.envelope with it), which no earlier in-memory edit can have touched.
    in_memory = True

    def __init__(self, spec: FilterSpec, *, settings: MilterSettings | None = None, reject_code: int = 550):
        self.settings = settings or MilterSettings()
        if self.settings.on_error not in ("tempfail", "accept"):
            raise FilterSpecError('[milter] on_error must be "tempfail" or "accept"')
        self.address = parse_milter_address(spec.argument, spec.text)
        self.name = f"milter:{self.address}"
        self.timeout = spec.timeout
        self.reject_code = reject_code
        relay = spec.relay
        self.domain = getattr(relay, "domain", "") or "localhost"
        self.durable = bool(relay.spool.durable) if relay is not None else True

    async def __call__(self, message: Message, stage: Any) -> FilterResult:
        content = Content(message.content, message.id)
        request = build_request(message, content, domain=self.domain, daemon_name=self.settings.daemon_name)
        try:
            async with asyncio.timeout(self.timeout):
                outcome = await mp.converse(self.address.connect, request)
        except TimeoutError:
            return self._unavailable(message, f"no answer within {self.timeout:g}s")
        except mp.MilterError as e:
            return self._unavailable(message, str(e))
        except OSError as e:
            return self._unavailable(message, e.strerror or str(e) or type(e).__name__)
        log.info("id=%s filter=%s decision=%s step=%s%s%s", message.id, self.name, outcome.decision.value,
                 outcome.step, f" edits={','.join(e.kind for e in outcome.edits)}" if outcome.edits else "",
                 f" quarantine={outcome.quarantine!r}" if outcome.quarantine is not None else "")
        return await self._act(message, stage, content, outcome)

    async def _act(self, message: Message, stage: str, content: Content, outcome: mp.Outcome) -> FilterResult:
        decision = outcome.decision
        reason = f"milter {self.address} at {outcome.step}"
        if decision is mp.Decision.REJECT or decision is mp.Decision.TEMPFAIL:
            code = outcome.code or (self.reject_code if decision is mp.Decision.REJECT else 451)
            default = "Command rejected" if code >= 500 else "Service unavailable - try again later"
            text = printable(outcome.text) or default
            enhanced = outcome.enhanced if outcome.code else f"{code // 100}.7.1"
            if code >= 500:
                return FilterResult.reject(text, code, enhanced, reason=reason)
            return FilterResult.fail(text, code, enhanced, reason=reason)
        if decision is mp.Decision.DISCARD:
            if stage == "client":  # the runner keeps whatever an abandoning filter leaves behind
                await asyncio.to_thread(remove_message, message, durable=self.durable)
            return FilterResult.abandon()
        new_content = None
        if any(e.kind.endswith(("_header", "_body")) for e in outcome.edits):
            for edit in outcome.edits:
                content.apply(edit)
            new_content = content.to_bytes()
        envelope = edit_envelope(message.envelope, outcome.edits)
        if outcome.quarantine is not None:
            return await self._quarantine(message, stage, outcome.quarantine, new_content, envelope)
        if envelope != message.envelope:
            if message.envelope_path is None:
                return FilterResult.fail(TEMPFAIL, 451, "4.3.0", reason="no envelope file to edit")
            if not envelope.recipients:
                log.warning("id=%s filter=%s removed every recipient", message.id, self.name)
            await asyncio.to_thread(replace_file, message.envelope_path, envelope.to_bytes(),
                                    durable=self.durable and stage == "client")
            message.envelope = envelope
        return FilterResult.ok(content=new_content)

    async def _quarantine(self, message: Message, stage: str, why: str, content: bytes | None,
                          envelope: Envelope) -> FilterResult:
        reason = f"milter {self.address}: {printable(why)}"
        if stage == "server" and message.transaction is not None:
            # The reception commits the message as .bad, as for an on_receive quarantine.
            message.transaction.quarantine_reason = reason
            if envelope != message.envelope and message.envelope_path is not None:
                await asyncio.to_thread(replace_file, message.envelope_path, envelope.to_bytes(), durable=False)
                message.envelope = envelope
            return FilterResult.ok(content=content)
        if message.envelope_path is None or message.content_path is None:
            return FilterResult.fail(TEMPFAIL, 451, "4.3.0", reason="no spool files to quarantine")
        # Written even when unchanged: an earlier filter's edit may still be in memory only.
        await asyncio.to_thread(_hold, message, message.content if content is None else content,
                                envelope.with_reason(f"quarantined: {reason}", 0), self.durable)
        log.warning("id=%s filter=%s quarantined: %s", message.id, self.name, reason)
        return FilterResult.abandon()  # the .busy file is gone: the runner lets go of the message

    def _unavailable(self, message: Message, why: str) -> FilterResult:
        if self.settings.on_error == "accept":
            log.warning("id=%s filter=%s milter unavailable, passing the message unfiltered: %s",
                        message.id, self.name, why)
            return FilterResult.ok()
        log.error("id=%s filter=%s milter unavailable: %s", message.id, self.name, why)
        return FilterResult.fail(TEMPFAIL, 451, "4.3.0", reason=f"milter {self.address}: {why}")


def _hold(message: Message, content: bytes, envelope: Envelope, durable: bool) -> None:
    """Client stage: write the content and the envelope, then move ``.envelope.busy`` to
    ``.envelope.bad``."""
    assert message.envelope_path is not None and message.content_path is not None
    replace_file(message.content_path, content, durable=durable)
    replace_file(message.envelope_path, envelope.to_bytes(), durable=durable)
    bad = message.envelope_path.with_name(f"{message.id}.envelope.bad")
    os.rename(message.envelope_path, bad)
    if durable:
        fsync_dir(bad.parent)


@hookimpl
def relay_config_schema() -> dict[str, type]:
    return {"milter": MilterSettings}


@hookimpl
def relay_filter_factory(register: Callable[[str, Callable[[FilterSpec], Any]], None]) -> None:
    def make(spec: FilterSpec) -> MilterFilter:
        relay = spec.relay
        settings = relay.plugin_settings("milter") if relay is not None else MilterSettings()
        reject_code = relay.plugin_settings("filters").reject_code if relay is not None else 550
        return MilterFilter(spec, settings=settings, reject_code=reject_code)

    register("milter", make)
