"""SMTP smuggling (SEC-Consult, December 2023): a fake end-of-data sequence must never end DATA.

For each variant the client sends one message whose body contains ``<variant>`` followed by a
complete second SMTP transaction, then the real ``CRLF.CRLF``. A vulnerable server stores two
messages (the second one "from" anyone); we must store exactly one, with the full content.
"""

from __future__ import annotations

import pytest

from smtpwire import Wire

# The end-of-data imitations from the SEC-Consult research and its follow-ups.
VARIANTS = {
    "lf.lf": b"\n.\n",
    "lf.crlf": b"\n.\r\n",
    "crlf.lf": b"\r\n.\n",
    "cr.cr": b"\r.\r",
    "cr.crlf": b"\r.\r\n",
    "crlf.cr": b"\r\n.\r",
    "lf.cr": b"\n.\r",
    "cr.lf": b"\r.\n",
    "crlf.null.crlf": b"\r\n.\x00\r\n",
    "crlf.crcrlf": b"\r\n.\r\r\n",
}

SMUGGLED = (b"MAIL FROM:<admin@bank.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\n"
            b"From: admin@bank.test\r\nSubject: smuggled\r\n\r\nSend money.\r\n")


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_fake_end_of_data_does_not_split_the_message(inprocess_relay, name):
    relay = inprocess_relay()
    variant = VARIANTS[name]
    body = (b"From: user@example.test\r\nSubject: innocent\r\n\r\nHello." + variant + SMUGGLED)
    with Wire(relay.port) as w:
        w.greet()
        w.send(b"MAIL FROM:<user@example.test>\r\nRCPT TO:<friend@example.test>\r\nDATA\r\n")
        assert [w.reply()[0] for _ in range(3)] == [250, 250, 354]
        w.send(body + b"\r\n.\r\nQUIT\r\n")
        replies = [w.reply()[0]]
        replies.append(w.reply()[0])
    # exactly one 250 for the data, then QUIT's 221: no second transaction was seen
    assert replies == [250, 221]
    ids = relay.spool.ids()
    assert len(ids) == 1, f"{name}: {len(ids)} messages spooled"
    envelope = relay.spool.read_envelope(ids[0])
    assert envelope.sender == "user@example.test"
    assert [r.address for r in envelope.recipients] == ["friend@example.test"]
    content = relay.spool.read_content(ids[0])
    # the full content, smuggling attempt included, is in the one message (a line that starts
    # with a dot loses that dot: RFC 5321 4.5.2 transparency)
    unstuffed = (b"\r\n" + body + b"\r\n").replace(b"\r\n.", b"\r\n")[2:]
    assert content.endswith(unstuffed), content[-200:]
    assert b"Send money." in content


def test_real_end_of_data_then_pipelined_command_still_works(inprocess_relay):
    relay = inprocess_relay()
    with Wire(relay.port) as w:
        w.greet()
        w.send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
        assert [w.reply()[0] for _ in range(3)] == [250, 250, 354]
        w.send(b"Subject: x\r\n\r\n..leading dot\r\n.\r\nNOOP\r\n")
        assert w.reply()[0] == 250
        assert w.reply()[0] == 250
    [message_id] = relay.spool.ids()
    assert relay.spool.read_content(message_id).endswith(b"\r\n.leading dot\r\n")
