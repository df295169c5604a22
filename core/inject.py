"""Injecting a message without SMTP (the JSON API, the pickup directory).

An injected message takes exactly the path an SMTP message takes: the ``on_mail_from`` and
``on_rcpt_to`` policies for a synthetic session, then ``Reception.data`` (``on_receive``, the
server filters, the durable commit). Only the wire is missing, so a policy cannot be bypassed by
choosing the API over SMTP.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .smtp.addresses import AddressError, normalise_mailbox
from .types import Recipient, Session, Transaction

if TYPE_CHECKING:  # pragma: no cover
    from .relay import Relay

_QUEUED = re.compile(r"^250 \S+ OK (?:queued|forwarded) as (\S+)")


class InjectionRefused(Exception):
    """The message was not accepted; ``reply`` is the SMTP reply that says why."""

    def __init__(self, reply: str, refused: Sequence[tuple[str, str]] = ()):
        super().__init__(reply)
        self.reply = reply
        self.refused = tuple(refused)

    @property
    def code(self) -> int:
        head = self.reply[:3]
        return int(head) if head.isdigit() else 451

    @property
    def temporary(self) -> bool:
        return self.code < 500


@dataclass(frozen=True)
class Injected:
    """An accepted message: its spool id, and the recipients refused (each with its reply)."""

    message_id: str
    refused: tuple[tuple[str, str], ...] = ()
    reply: str = ""


async def inject(relay: Relay, sender: str, recipients: Sequence[str], content: bytes, *,
                 client_ip: str = "127.0.0.1", auth_user: str = "", helo: str = "localhost") -> Injected:
    """Queue ``content`` for ``recipients`` as if a client at ``client_ip`` had sent it over SMTP.

    ``auth_user`` is the authenticated user (the API's login), so policies that trust
    authenticated submitters treat the API the same way. Line endings are normalised to CRLF.
    Raises :class:`InjectionRefused` when the sender, every recipient or the message is refused.
    """
    if not recipients:
        raise InjectionRefused("554 5.5.1 No valid recipients")
    reception = relay.reception
    session = Session(peer_ip=client_ip, peer_port=0, helo=helo, esmtp=True, auth_user=auth_user,
                      auth_mechanism="API" if auth_user else "")
    try:
        address, non_ascii = normalise_mailbox(sender) if sender else ("", False)
    except AddressError as e:
        raise InjectionRefused(e.reply) from None
    body = _crlf(content)
    transaction = Transaction(sender=address, smtputf8=non_ascii,
                              body="7bit" if body.isascii() else "8bit", size_hint=len(body))
    session.transaction = transaction
    size_limit = relay.settings.smtp.size
    if size_limit and len(body) > size_limit:
        raise InjectionRefused(f"552 5.3.4 Message size exceeds fixed maximum message size ({size_limit} octets)")

    verdict = await reception.mail_from(session, transaction)
    if not verdict.accepted:
        raise InjectionRefused(verdict.reply())
    refused: list[tuple[str, str]] = []
    for raw in recipients:
        try:
            rcpt, rcpt_non_ascii = normalise_mailbox(raw, allow_postmaster=True)
        except AddressError as e:
            refused.append((raw, e.reply))
            continue
        transaction.smtputf8 |= rcpt_non_ascii
        recipient = Recipient(rcpt)
        verdict = await reception.rcpt_to(session, transaction, recipient)
        if verdict.accepted:
            transaction.recipients.append(verdict.recipient or recipient)
        else:
            refused.append((raw, verdict.reply()))
    if not transaction.recipients:
        raise InjectionRefused(refused[0][1] if len(refused) == 1 else "554 5.5.1 No valid recipients", refused)

    reply = await reception.data(session, transaction, body)
    if not reply.startswith("250"):
        raise InjectionRefused(reply, refused)
    queued = _QUEUED.match(reply)
    # A discarded or abandoned message is accepted but has no spool id.
    return Injected(queued.group(1) if queued else "", tuple(refused), reply)


def _crlf(content: bytes) -> bytes:
    """Normalise bare LF and bare CR to CRLF, as the SMTP DATA reader's output would be."""
    content = re.sub(rb"\r\n|\r|\n", b"\r\n", content)
    return content if content.endswith(b"\r\n") or not content else content + b"\r\n"
