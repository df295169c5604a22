"""mailrelay.inject: messages queued without SMTP go through the same policies and spool path."""

from __future__ import annotations

import pytest

from mailrelay.hookspecs import hookimpl
from mailrelay.inject import InjectionRefused, inject
from mailrelay.spool.envelope import Envelope
from mailrelay.types import Verdict


class RefuseSpamTrap:
    """Policies an API caller must not be able to bypass."""

    @hookimpl
    def on_mail_from(self, session, transaction, address):
        if address == "blocked@example.test":
            return Verdict.deny("Sender blocked", code=550, enhanced="5.7.1")
        return None

    @hookimpl
    def on_rcpt_to(self, session, transaction, recipient):
        if recipient.address.startswith("trap@"):
            return Verdict.deny("No such user", code=550, enhanced="5.1.1")
        return None

    @hookimpl
    def on_receive(self, message):
        if b"X-Reject-Me" in message.content:
            return Verdict.deny("Content refused", code=554, enhanced="5.7.1")
        return None


def _envelope(relay, message_id: str) -> Envelope:
    return Envelope.from_bytes((relay.spool.directory / f"{message_id}.envelope").read_bytes())


def test_injected_message_is_spooled_with_received_header_and_crlf(inprocess_relay):
    relay = inprocess_relay(plugins={"policy": RefuseSpamTrap()})
    result = relay.call(inject(relay.relay, "app@example.test", ["a@example.test", "trap@example.test"],
                               b"Subject: hi\n\nline one\nline two", client_ip="192.0.2.7", auth_user="api-user"))
    assert result.message_id
    assert result.refused == (("trap@example.test", "550 5.1.1 No such user"),)
    envelope = _envelope(relay, result.message_id)
    assert envelope.sender == "app@example.test"
    assert [r.address for r in envelope.recipients] == ["a@example.test"]
    assert envelope.authentication == "api-user"
    assert envelope.client == "192.0.2.7"
    content = (relay.spool.directory / f"{result.message_id}.content").read_bytes()
    assert content.startswith(b"Received: from localhost ([192.0.2.7]) by relay.test with ESMTPA")
    assert content.endswith(b"Subject: hi\r\n\r\nline one\r\nline two\r\n")


@pytest.mark.parametrize("sender, recipients, content, reply", [
    ("blocked@example.test", ["a@example.test"], b"x", "550 5.7.1 Sender blocked"),
    ("app@example.test", ["trap@example.test"], b"x", "550 5.1.1 No such user"),
    ("app@example.test", [], b"x", "554 5.5.1 No valid recipients"),
    ("not an address", ["a@example.test"], b"x", "501 5.1.3"),
    ("app@example.test", ["a@example.test"], b"X-Reject-Me: 1\r\n\r\nx", "554 5.7.1 Content refused"),
])
def test_policies_refuse_injected_messages(inprocess_relay, sender, recipients, content, reply):
    relay = inprocess_relay(plugins={"policy": RefuseSpamTrap()})
    with pytest.raises(InjectionRefused) as refused:
        relay.call(inject(relay.relay, sender, recipients, content))
    assert refused.value.reply.startswith(reply)
    assert not list(relay.spool.directory.glob("emailrelay.*"))


def test_size_limit_applies(inprocess_relay):
    relay = inprocess_relay(config={"smtp": {"size": 2000}})
    with pytest.raises(InjectionRefused) as refused:
        relay.call(inject(relay.relay, "", ["a@example.test"], b"Subject: big\r\n\r\n" + b"x" * 3000))
    assert refused.value.code == 552
