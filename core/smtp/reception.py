"""What happens to a session's commands and messages: hooks, envelope, spool, server filters.

This module knows nothing of aiosmtpd; the protocol module parses the wire and asks this one for
a verdict or a reply. The order of DATA processing is the durability contract:

    on_receive -> write content + .envelope.new -> server filters -> commit marker, one flush,
    rename -> 250
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..message import Message
from ..plugin_host import PluginFailure
from ..spool import Envelope, SpoolError
from ..types import Action, Event, FilterAction, Recipient, Session, Transaction, Verdict
from .received import count_hops, received_header

if TYPE_CHECKING:  # pragma: no cover
    from ..relay import Relay

log = logging.getLogger("mailrelay.smtp")

REMOTE_REFUSED = Verdict.deny("Connections from remote addresses are not accepted here",
                              code=554, enhanced="5.7.1", reason="remote client without --remote-clients")


class Reception:
    """One per relay; shared by all sessions."""

    def __init__(self, relay: Relay):
        self.relay = relay
        self.hooks = relay.hooks
        self.spool = relay.spool
        self.smtp = relay.settings.smtp
        self.domain = relay.domain

    # ---------------------------------------------------------------- phases
    async def connect(self, session: Session) -> Verdict:
        if not session.is_loopback and not self.smtp.remote_clients:
            log.warning("session=%s client=%s refused: remote clients are not enabled (--remote-clients)",
                        session.id, session.peer_ip)
            return self._refused("connect", session, REMOTE_REFUSED)
        return self._refused("connect", session, await self.hooks.decide("on_connect", session=session))

    async def auth_mechanisms(self, session: Session) -> list[str]:
        try:
            offered = await self.hooks.first("auth_mechanisms", session=session)
        except PluginFailure as e:
            log.error("%s; offering no AUTH", e)
            return []
        return list(offered or [])

    async def auth(self, session: Session, mechanism: str, username: str, password: str | None,
                   challenge: str | None, response: str | None) -> Verdict:
        verdict = await self.hooks.decide("on_auth", session=session, mechanism=mechanism, username=username,
                                          password=password, challenge=challenge, response=response)
        # The one auth event per SMTP attempt, whichever plugin decided (POP3 and admin emit their own).
        self._event("auth.succeeded" if verdict.action is Action.OK else "auth.failed", session, "",
                    mechanism=mechanism, user=username, service="smtp", reason=verdict.reason or "")
        return verdict

    async def helo(self, session: Session, hostname: str) -> Verdict:
        return self._refused("helo", session, await self.hooks.decide("on_helo", session=session, hostname=hostname))

    async def vrfy(self, session: Session, address: str) -> Verdict:
        return await self.hooks.decide("on_vrfy", session=session, address=address)

    async def mail_from(self, session: Session, transaction: Transaction) -> Verdict:
        verdict = await self.hooks.decide("on_mail_from", session=session, transaction=transaction,
                                          address=transaction.sender)
        _mark(transaction, verdict)
        return self._refused("mail", session, verdict, address=transaction.sender)

    async def rcpt_to(self, session: Session, transaction: Transaction, recipient: Recipient) -> Verdict:
        verdict = await self.hooks.decide("on_rcpt_to", session=session, transaction=transaction,
                                          recipient=recipient)
        _mark(transaction, verdict)
        return self._refused("rcpt", session, verdict, address=recipient.address)

    # ---------------------------------------------------------------- DATA
    async def data(self, session: Session, transaction: Transaction, body: bytes) -> str:
        """Process a complete message; return the reply for the end of DATA."""
        message_id = self.spool.new_id()
        header = (b"" if "content" in self.smtp.anonymous  # --anonymous: no Received: line
                  else received_header(session, self.domain, message_id, transaction.smtputf8))
        hops = count_hops(body) + 1
        if hops > self.smtp.max_hops:
            self._event("rejected", session, message_id, reason="mail loop", hops=hops)
            return f"554 5.4.6 Too many hops ({hops} Received: headers): mail loop detected"
        envelope = Envelope(
            sender=transaction.sender,
            recipients=tuple(transaction.recipients),
            content=transaction.body,
            authentication=session.auth_user,
            client=session.peer_ip,
            client_certificate=session.client_certificate,
            mail_from_auth_in=transaction.auth_param,
            utf8_mailbox_names=transaction.smtputf8 and not (
                transaction.sender.isascii() and all(r.address.isascii() for r in transaction.recipients)),
        )
        message = Message(envelope, header + body, id=message_id, session=session, transaction=transaction)
        received = message.content

        verdict = await self.hooks.decide("on_receive", message=message)
        _mark(transaction, verdict)
        if not verdict.accepted:
            self._event("rejected", session, message_id, reason=verdict.reason or verdict.text,
                        code=verdict.code)
            return verdict.reply()
        if transaction.discard:
            self._event("discarded", session, message_id, sender=transaction.sender)
            return "250 2.0.0 OK (discarded)" if self.relay.settings.log.verbose else "250 2.0.0 OK"

        filtering = self.hooks.has("on_filter")
        quarantine = transaction.quarantine_reason
        try:
            # An on_receive plugin may have edited the message (a header added, say).
            parts = [header, body] if message.content is received else [message.content]
            pending = await self.spool.write(message_id, envelope, parts, commit=not (filtering or quarantine))
        except SpoolError as e:
            return _spool_reply(e)
        message.content_path = pending.content_path
        message.envelope_path = pending.envelope_path

        if filtering:
            edited = False

            async def note_edit(_: bytes) -> None:
                nonlocal edited
                edited = True

            result = await self.hooks.filter_chain(message, "server", apply_edit=note_edit)
            quarantine = transaction.quarantine_reason  # a filter may hold it too (a milter's quarantine)
            if result.rescan and self.relay.queue is not None:
                self.relay.queue.wake()  # the filter made new messages (exit 102-104)
            if result.action is not FilterAction.OK:
                self.spool.abort(pending)
                if result.action is FilterAction.ABANDON:
                    self._event("abandoned", session, message_id, sender=transaction.sender)
                    return "250 2.0.0 OK"
                code = result.code or (451 if result.action is FilterAction.FAIL else 550)
                enhanced = result.enhanced or f"{code // 100}.7.1"
                self._event("rejected", session, message_id, reason=result.text or "filter", code=code)
                return f"{code} {enhanced} {result.text or 'Rejected by filter'}"
            try:
                await self.spool.commit(
                    pending, new_content=message.content if edited else None,
                    envelope=message.envelope.with_reason(f"quarantined: {quarantine}", 0) if quarantine else None,
                    state="bad" if quarantine else "ready")
            except SpoolError as e:
                self.spool.abort(pending)
                return _spool_reply(e)
        elif quarantine:
            try:
                await self.spool.commit(pending, envelope=envelope.with_reason(f"quarantined: {quarantine}", 0),
                                        state="bad")
            except SpoolError as e:
                self.spool.abort(pending)
                return _spool_reply(e)

        if not quarantine:
            self.relay.message_committed(message_id)
        self._event("quarantined" if quarantine else "received", session, message_id,
                    sender=transaction.sender, recipients=[r.address for r in transaction.recipients],
                    size=len(message.content), reason=quarantine)
        if not quarantine and self.relay.queue is not None and self.relay.settings.queue.immediate:
            return await self._forward_before_acknowledging(session, message_id)
        log.info("session=%s id=%s from=<%s> rcpts=%d size=%d%s", session.id, message_id,
                 transaction.sender, len(transaction.recipients), len(message.content),
                 f" quarantined={quarantine!r}" if quarantine else "")
        return f"250 2.0.0 OK queued as {message_id}"

    async def _forward_before_acknowledging(self, session: Session, message_id: str) -> str:
        assert self.relay.queue is not None
        outcome = await self.relay.queue.forward_now(message_id)
        if outcome is None or not outcome.reply:
            return f"250 2.0.0 OK forwarded as {message_id}"
        code, _, text = outcome.reply.partition(" ")
        if not (code.isdigit() and code[0] in "45"):
            code, text = "451", outcome.reply
        log.info("session=%s id=%s not forwarded (--immediate): %s", session.id, message_id, outcome.reply)
        return f"{code} {text}"

    def _refused(self, phase: str, session: Session, verdict: Verdict, **data: object) -> Verdict:
        """Pass ``verdict`` on; when it refuses the command, tell observers (``smtp.rejected``)."""
        if not verdict.accepted:
            self._event("smtp.rejected", session, "", phase=phase, code=verdict.code,
                        reason=verdict.reason or verdict.text, **data)
        return verdict

    def _event(self, name: str, session: Session, message_id: str, **data: object) -> None:
        self.hooks.emit(Event(name, message_id=message_id, session_id=session.id,
                              data={"client": session.peer_ip, **data}))


def _mark(transaction: Transaction, verdict: Verdict) -> None:
    if verdict.action is Action.DISCARD:
        transaction.discard = True
    elif verdict.action is Action.QUARANTINE:
        transaction.quarantine_reason = verdict.reason or "quarantined by policy"


def _spool_reply(error: SpoolError) -> str:
    if error.disk_full:
        return "452 4.3.1 Insufficient system storage, try again later"
    return "451 4.3.0 Local error in processing: could not store the message"
