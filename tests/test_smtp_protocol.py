"""The SMTP server as clients see it: extensions, limits, replies, and what ends up in the spool."""

from __future__ import annotations

import smtplib
import subprocess

import pytest

from mailrelay.spool import Envelope
from smtpwire import Wire
from conftest import require

MSG = b"From: a@example.test\r\nTo: b@example.test\r\nSubject: hello\r\n\r\nHello there.\r\n"


def stored(relay) -> list[tuple[Envelope, bytes]]:
    return [(relay.spool.read_envelope(i), relay.spool.read_content(i)) for i in relay.spool.ids()]


def test_ehlo_advertises_the_extensions_a_relay_needs(inprocess_relay):
    relay = inprocess_relay(config={"smtp": {"size": 100000}})
    with smtplib.SMTP("127.0.0.1", relay.port) as client:
        code, _ = client.ehlo("client.test")
        assert code == 250
        features = client.esmtp_features
    assert {"pipelining", "8bitmime", "smtputf8", "enhancedstatuscodes"} <= set(features)
    assert features["size"] == "100000"


def test_message_is_spooled_with_envelope_and_received_header(inprocess_relay):
    relay = inprocess_relay()
    with smtplib.SMTP("127.0.0.1", relay.port) as client:
        client.ehlo("client.test")
        client.sendmail("a@example.test", ["b@example.test", "c@example.test"], MSG)
    [(envelope, content)] = stored(relay)
    assert envelope.sender == "a@example.test"
    assert [r.address for r in envelope.recipients] == ["b@example.test", "c@example.test"]
    assert envelope.client == "127.0.0.1"
    assert content.startswith(b"Received: from client.test ([127.0.0.1]) by relay.test with ESMTP id ")
    assert content.endswith(MSG)


def test_null_reverse_path_is_accepted_for_bounces(inprocess_relay):
    relay = inprocess_relay()
    with Wire(relay.port) as w:
        w.greet()
        assert w.cmd("MAIL FROM:<>")[0] == 250
        assert w.cmd("RCPT TO:<postmaster@example.test>")[0] == 250
        assert w.cmd("DATA")[0] == 354
        code, text = w.cmd(b"Subject: bounce\r\n\r\nundeliverable\r\n.")
        assert code == 250, text
    [(envelope, _)] = stored(relay)
    assert envelope.sender == ""


def test_body_8bitmime_and_enhanced_codes(inprocess_relay):
    relay = inprocess_relay()
    with Wire(relay.port) as w:
        w.greet()
        code, text = w.cmd("MAIL FROM:<a@example.test> BODY=8BITMIME")
        assert (code, text) == (250, "2.1.0 Sender OK")
        assert w.cmd("RCPT TO:<b@example.test>") == (250, "2.1.5 Recipient OK")
        w.cmd("DATA")
        code, text = w.cmd("Subject: caf\xe9\r\n\r\ncaf\xe9\r\n.".encode("utf-8"))
        assert code == 250 and text.startswith("2.0.0 ")
    [(envelope, content)] = stored(relay)
    assert envelope.content == "8bit"
    assert "café".encode() in content


def test_smtputf8_addresses_need_the_parameter(inprocess_relay):
    relay = inprocess_relay()
    with Wire(relay.port) as w:
        w.greet()
        code, text = w.cmd("MAIL FROM:<jürgen@exämple.test>".encode())
        assert code == 553 and "SMTPUTF8" in text
        assert w.cmd("MAIL FROM:<jürgen@exämple.test> SMTPUTF8".encode())[0] == 250
        assert w.cmd("RCPT TO:<müller@far.test>".encode())[0] == 250
        w.cmd("DATA")
        assert w.cmd(b"Subject: x\r\n\r\nx\r\n.")[0] == 250
    [(envelope, content)] = stored(relay)
    assert envelope.sender == "jürgen@xn--exmple-cua.test"  # domain as A-labels, as E-MailRelay stores it
    assert envelope.utf8_mailbox_names
    assert b" with UTF8SMTP id " in content


def test_command_line_over_512_octets_is_refused(inprocess_relay):
    relay = inprocess_relay()
    with Wire(relay.port) as w:
        w.greet()
        code, _ = w.cmd("NOOP " + "x" * 520)
        assert code == 500
        assert w.cmd("NOOP")[0] == 250  # the session goes on


def test_text_line_over_1000_octets_is_refused_after_data(inprocess_relay):
    relay = inprocess_relay()
    with Wire(relay.port) as w:
        w.greet()
        w.cmd("MAIL FROM:<a@example.test>")
        w.cmd("RCPT TO:<b@example.test>")
        w.cmd("DATA")
        code, text = w.cmd(b"Subject: long\r\n\r\n" + b"y" * 999 + b"\r\n.")
        assert code == 500 and "1000" in text
        # a line of exactly 998 octets plus CRLF is fine, and the session is usable
        w.cmd("MAIL FROM:<a@example.test>")
        w.cmd("RCPT TO:<b@example.test>")
        w.cmd("DATA")
        assert w.cmd(b"Subject: ok\r\n\r\n" + b"z" * 998 + b"\r\n.")[0] == 250
    [(_, content)] = stored(relay)
    assert b"z" * 998 + b"\r\n" in content


def test_at_most_100_recipients_then_452(inprocess_relay):
    relay = inprocess_relay()
    with Wire(relay.port) as w:
        w.greet()
        w.cmd("MAIL FROM:<a@example.test>")
        codes = [w.cmd(f"RCPT TO:<r{i}@example.test>")[0] for i in range(101)]
        assert codes[:100] == [250] * 100
        assert codes[100] == 452
        w.cmd("DATA")
        assert w.cmd(b"Subject: many\r\n\r\nhi\r\n.")[0] == 250
    [(envelope, _)] = stored(relay)
    assert len(envelope.recipients) == 100


def test_size_is_enforced_by_parameter_and_during_data(inprocess_relay):
    relay = inprocess_relay(config={"smtp": {"size": 2000}})
    with Wire(relay.port) as w:
        w.greet()
        code, text = w.cmd("MAIL FROM:<a@example.test> SIZE=5000")
        assert code == 552 and text.startswith("5.3.4")
        assert w.cmd("MAIL FROM:<a@example.test> SIZE=100")[0] == 250  # a lie...
        w.cmd("RCPT TO:<b@example.test>")
        w.cmd("DATA")
        code, _ = w.cmd(b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n" * 1 + (b"y" * 70 + b"\r\n") * 60 + b".")
        assert code == 552  # ...caught during DATA
        assert w.cmd("NOOP")[0] == 250
    assert stored(relay) == []


def test_mail_loop_is_detected_by_hop_count(inprocess_relay):
    relay = inprocess_relay()
    hops = b"".join(b"Received: from h%d by h%d; Wed, 25 Nov 2026 10:00:00 +0000\r\n" % (i, i)
                    for i in range(100))
    with smtplib.SMTP("127.0.0.1", relay.port) as client:
        with pytest.raises(smtplib.SMTPDataError) as e:
            client.sendmail("a@example.test", ["b@example.test"], hops + MSG)
        assert e.value.smtp_code == 554 and b"5.4.6" in e.value.smtp_error
        client.sendmail("a@example.test", ["b@example.test"], hops[: -len(hops) // 2] + MSG)
    assert len(stored(relay)) == 1


def test_pipelined_transactions_in_one_packet(inprocess_relay):
    relay = inprocess_relay()
    with Wire(relay.port) as w:
        w.greet()
        batch = b"".join([
            b"MAIL FROM:<a@example.test>\r\n", b"RCPT TO:<b@example.test>\r\n", b"DATA\r\n",
            b"Subject: one\r\n\r\nfirst\r\n.\r\n",
            b"MAIL FROM:<c@example.test>\r\n", b"RCPT TO:<d@example.test>\r\n", b"DATA\r\n",
            b"Subject: two\r\n\r\nsecond\r\n.\r\n", b"QUIT\r\n"])
        w.send(batch)
        codes = [w.reply()[0] for _ in range(9)]
    assert codes == [250, 250, 354, 250, 250, 250, 354, 250, 221]
    bodies = sorted(content.split(b"\r\n\r\n", 1)[1] for _, content in stored(relay))
    assert bodies == [b"first\r\n", b"second\r\n"]


def test_command_sequence_errors(inprocess_relay):
    relay = inprocess_relay()
    with Wire(relay.port) as w:
        w.reply()
        assert w.cmd("MAIL FROM:<a@example.test>")[0] == 503  # no HELO yet
        assert w.cmd("EHLO bad\x01name")[0] == 501
        assert w.cmd("EHLO client.test")[0] == 250
        assert w.cmd("RCPT TO:<b@example.test>")[0] == 503
        assert w.cmd("DATA")[0] == 503
        assert w.cmd("MAIL FROM:<a@example.test>")[0] == 250
        assert w.cmd("MAIL FROM:<a@example.test>")[0] == 503  # nested
        assert w.cmd("DATA")[0] == 554                        # no recipients
        assert w.cmd("RCPT TO:<not an address>")[0] == 501
        assert w.cmd("RCPT TO:<b@example.test> NOTIFY=NEVER")[0] == 555
        assert w.cmd("RSET")[0] == 250
        assert w.cmd("RCPT TO:<b@example.test>")[0] == 503  # RSET ended the transaction
        assert w.cmd("QUIT")[0] == 221
        assert w.closed()


def test_bare_lf_does_not_end_a_command(inprocess_relay):
    relay = inprocess_relay()
    with Wire(relay.port) as w:
        w.greet()
        # "MAIL ...\nRCPT ..." is one (bad) line, not two commands
        code, _ = w.cmd("MAIL FROM:<a@example.test>\nRCPT TO:<b@example.test>")
        assert code in (501, 555)
        assert w.cmd("RCPT TO:<b@example.test>")[0] == 503  # no transaction was started


def test_swaks_pipelining_end_to_end(inprocess_relay, tmp_path):
    swaks = require("swaks")
    relay = inprocess_relay()
    result = subprocess.run([swaks, "--server", f"127.0.0.1:{relay.port}", "--from", "a@example.test",
                             "--to", "b@example.test,c@example.test", "--helo", "client.test",
                             "--pipeline", "--header", "Subject: via swaks"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PIPELINING" in result.stdout
    [(envelope, content)] = stored(relay)
    assert len(envelope.recipients) == 2
    assert b"Subject: via swaks" in content
