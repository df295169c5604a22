"""Store and forward: mail reaches a smarthost or the MX host, per-recipient outcomes, retries, bounces."""

from __future__ import annotations

import json
import shutil
import smtplib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import free_port, require, wait_until
from mailrelay_sdk import hookimpl
from sinks import Behaviour

MSG = b"From: a@example.test\r\nTo: x@far.test\r\nSubject: forward me\r\nMessage-ID: <fw1@example.test>\r\n\r\nbody\r\n"




def forwarding(sink_port: int, **queue) -> dict:
    return {"forward": {"to": f"127.0.0.1:{sink_port}"}, "queue": {"retry": ["1s"], **queue}}


def message_ids(relay) -> list[str]:
    """Ids of every message in the spool, whatever its state (ready, busy, bad)."""
    return sorted(p.name[: -len(".content")] for p in relay.spool.directory.glob("*.content"))


def spool_files(relay) -> list[str]:
    return sorted(p.name for p in relay.spool.directory.iterdir())


class Events:
    def __init__(self):
        self.seen = []

    @hookimpl
    def on_event(self, event):
        self.seen.append(event)

    def names(self):
        return [e.name for e in self.seen]


def test_message_is_forwarded_to_the_smarthost_and_leaves_the_spool(inprocess_relay, sink):
    target = sink()
    events = Events()
    relay = inprocess_relay(enable=["forward"], plugins={"events": events}, config=forwarding(target.port))
    with smtplib.SMTP("127.0.0.1", relay.port) as client:
        client.sendmail("a@example.test", ["x@far.test", "y@far.test"], MSG)
    [got] = target.wait_for(1)
    assert got.sender == "a@example.test" and got.recipients == ["x@far.test", "y@far.test"]
    assert got.content.endswith(MSG) and got.content.startswith(b"Received: from ")
    wait_until(lambda: spool_files(relay) == [], what="an empty spool")
    wait_until(lambda: events.names().count("message.delivered") == 2, what="delivered events")


@pytest.mark.parametrize("pipelining", [False, True], ids=["sequential", "pipelined"])
def test_per_recipient_outcomes_retry_only_the_deferred(inprocess_relay, sink, pipelining):
    target = sink(Behaviour(refuse={"later": "451 4.2.1 mailbox busy", "nobody": "550 5.1.1 no such user"},
                            pipelining=pipelining))
    relay = inprocess_relay(enable=["forward"], config=forwarding(target.port, retry=["1h"]))
    with smtplib.SMTP("127.0.0.1", relay.port) as client:
        client.sendmail("a@example.test", ["ok@far.test", "later@far.test", "nobody@far.test"], MSG)
    received = target.wait_for(2)  # the message for ok@, and the bounce for nobody@ back to a@
    original = next(r for r in received if r.sender == "a@example.test")
    assert original.recipients == ["ok@far.test"]
    bounce = next(r for r in received if r.sender == "")
    assert bounce.recipients == ["a@example.test"]
    report = bounce.message
    assert report.get_content_type() == "multipart/report"
    status = report.get_payload()[1]
    text = status.as_string() if hasattr(status, "as_string") else str(status)
    assert "Final-Recipient: rfc822; nobody@far.test" in text and "Status: 5.1.1" in text
    assert "later@far.test" not in text
    # the deferred recipient waits for its retry, alone in the envelope
    [message_id] = wait_until(lambda: relay.spool.ids() or None, what="the deferred message")
    envelope = relay.spool.read_envelope(message_id)
    assert [r.address for r in envelope.recipients] == ["later@far.test"]
    state = json.loads((relay.spool.directory / f"{message_id}.retry").read_text())
    assert state["delivered"] == ["ok@far.test"]
    assert state["next_attempt"] > time.time() + 3000
    assert any("451 4.2.1 mailbox busy" in a["error"] for a in state["attempts"])


def test_smarthost_down_then_up_delivers_exactly_once(inprocess_relay, sink):
    port = free_port()
    relay = inprocess_relay(enable=["forward"], config=forwarding(port))
    with smtplib.SMTP("127.0.0.1", relay.port) as client:
        client.sendmail("a@example.test", ["x@far.test"], MSG)
    [message_id] = message_ids(relay)
    wait_until(lambda: (relay.spool.directory / f"{message_id}.retry").exists(), what="a failed attempt")
    state = json.loads((relay.spool.directory / f"{message_id}.retry").read_text())
    assert "4.4.1" in state["attempts"][0]["error"]
    target = sink(port=port)
    [got] = target.wait_for(1)
    assert got.recipients == ["x@far.test"]
    wait_until(lambda: spool_files(relay) == [], what="an empty spool")
    time.sleep(1.5)  # a second retry would have happened by now
    assert len(target.received) == 1


def test_connection_dropped_in_data_is_retried(inprocess_relay, sink):
    behaviour = Behaviour(drop_in_data=True)
    target = sink(behaviour)
    relay = inprocess_relay(enable=["forward"], config=forwarding(target.port))
    with smtplib.SMTP("127.0.0.1", relay.port) as client:
        client.sendmail("a@example.test", ["x@far.test"], MSG)
    [message_id] = message_ids(relay)
    wait_until(lambda: (relay.spool.directory / f"{message_id}.retry").exists(), what="a failed attempt")
    behaviour.drop_in_data = False
    [got] = target.wait_for(1)
    assert got.content.endswith(MSG)
    wait_until(lambda: spool_files(relay) == [], what="an empty spool")


def test_permanent_failure_bounces_and_keeps_a_bad_envelope(inprocess_relay, sink):
    target = sink(Behaviour(refuse={"nobody": "550 5.1.1 no such user"}))
    events = Events()
    relay = inprocess_relay(enable=["forward"], plugins={"events": events}, config=forwarding(target.port))
    with smtplib.SMTP("127.0.0.1", relay.port) as client:
        client.sendmail("a@example.test", ["nobody@far.test"], MSG)
    [bounce] = target.wait_for(1)
    assert bounce.sender == "" and bounce.recipients == ["a@example.test"]
    headers = bounce.message.get_payload()[2]
    assert "Subject: forward me" in str(headers) and "body" not in str(headers).split("Subject")[1]
    [bad] = wait_until(lambda: relay.spool.ids("bad") or None, what="a .bad envelope")
    envelope = relay.spool.read_envelope(bad, "bad")
    assert "550 5.1.1 no such user" in envelope.reason and envelope.reason_code == "550"
    wait_until(lambda: "message.bounced" in events.names(), what="a bounced event")


def test_no_bounce_for_a_bounce(inprocess_relay, sink):
    target = sink(Behaviour(refuse={"nobody": "550 5.1.1 no such user"}))
    relay = inprocess_relay(enable=["forward"], config=forwarding(target.port))
    with smtplib.SMTP("127.0.0.1", relay.port) as client:
        client.sendmail("<>", ["nobody@far.test"], MSG)
    wait_until(lambda: relay.spool.ids("bad") or None, what="a .bad envelope")
    time.sleep(0.5)
    assert target.received == [] and relay.spool.ids() == []


def test_a_deferred_message_expires_and_bounces(inprocess_relay, sink):
    target = sink(Behaviour(refuse={"later": "451 4.2.1 mailbox busy"}))
    relay = inprocess_relay(enable=["forward"], config=forwarding(target.port, max_age="2s"))
    with smtplib.SMTP("127.0.0.1", relay.port) as client:
        client.sendmail("a@example.test", ["later@far.test"], MSG)
    [bounce] = target.wait_for(1, timeout=20)
    text = bounce.content.decode()
    assert bounce.sender == "" and "Status: 4.4.7" in text and "mailbox busy" in text
    wait_until(lambda: relay.spool.ids("bad") or None, what="a .bad envelope")


def test_forward_to_field_set_by_a_filter_overrides_routing(inprocess_relay, sink):
    routed, chosen = sink(), sink()

    class Redirect:
        @hookimpl
        def on_filter(self, message, stage):
            if stage == "server":
                path = message.content_path.with_name(message.id + ".envelope.new")
                path.write_bytes(path.read_bytes().replace(
                    b"X-MailRelay-ForwardTo: \r\n", f"X-MailRelay-ForwardTo: 127.0.0.1:{chosen.port}\r\n".encode()))
            return None

    relay = inprocess_relay(enable=["forward"], plugins={"redirect": Redirect()}, config=forwarding(routed.port))
    with smtplib.SMTP("127.0.0.1", relay.port) as client:
        client.sendmail("a@example.test", ["x@far.test"], MSG)
    chosen.wait_for(1)
    assert routed.received == []


def test_routing_table_with_wildcards_and_default(inprocess_relay, sink):
    a, b, default = sink(), sink(), sink()
    relay = inprocess_relay(enable=["forward"], config={
        "forward": {"to": ""}, "queue": {"retry": ["1s"]},
        "routes": {"example.com": f"127.0.0.1:{a.port}", "*.corp.test": f"127.0.0.1:{b.port}",
                   "*": f"127.0.0.1:{default.port}"}})
    with smtplib.SMTP("127.0.0.1", relay.port) as client:
        client.sendmail("s@example.test", ["u@example.com", "v@mail.corp.test", "w@elsewhere.test"], MSG)
    assert a.wait_for(1)[0].recipients == ["u@example.com"]
    assert b.wait_for(1)[0].recipients == ["v@mail.corp.test"]
    assert default.wait_for(1)[0].recipients == ["w@elsewhere.test"]


def test_smtputf8_message_is_refused_by_a_hop_without_smtputf8(inprocess_relay, sink):
    target = sink(Behaviour(smtputf8=False))
    relay = inprocess_relay(enable=["forward"], config=forwarding(target.port))
    with smtplib.SMTP("127.0.0.1", relay.port) as client:
        client.ehlo("c.test")
        client.sendmail("jürgen@example.test", ["x@far.test"], MSG, mail_options=["SMTPUTF8"])
    # The original fails; so does the bounce to jürgen@ (same hop), which is not bounced again.
    bad = wait_until(lambda: len(relay.spool.ids("bad")) == 2 and relay.spool.ids("bad"), what="two .bad envelopes")
    envelopes = {relay.spool.read_envelope(i, "bad").sender: relay.spool.read_envelope(i, "bad") for i in bad}
    assert set(envelopes) == {"jürgen@example.test", ""}
    assert "SMTPUTF8" in envelopes["jürgen@example.test"].reason
    assert target.received == []


def test_delivery_to_postfix_smtp_sink(inprocess_relay):
    """A peer nobody here wrote: Postfix's smtp-sink (advertises PIPELINING, stores each message)."""
    smtp_sink = require("smtp-sink")
    port = free_port()
    # smtp-sink writes as "nobody": pytest's tmp_path lives under a 0700 directory, so use /tmp
    dump = Path(tempfile.mkdtemp(prefix="smtp-sink-"))
    dump.chmod(0o777)
    proc = subprocess.Popen([smtp_sink, "-u", "nobody", "-c", "-d", f"{dump}/%M.", f"127.0.0.1:{port}", "10"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: subprocess.run([sys.executable, "-c", f"import socket; socket.create_connection(('127.0.0.1', {port}), 1)"]).returncode == 0,
                   what="smtp-sink")
        relay = inprocess_relay(enable=["forward"], config=forwarding(port))
        with smtplib.SMTP("127.0.0.1", relay.port) as client:
            for n in range(5):
                client.sendmail("a@example.test", [f"r{n}@far.test"], MSG.replace(b"fw1", f"fw{n}".encode()))
        wait_until(lambda: relay.spool.ids() == [] and not list(relay.spool.directory.glob("*.busy")) or None,
                   what="an empty spool")
        stored = wait_until(lambda: len(list(dump.glob("*"))) >= 5 and list(dump.glob("*")), what="5 dumps")
        texts = [p.read_bytes() for p in stored]
        assert all(b"Subject: forward me" in t for t in texts)
        assert sorted(t.split(b"Message-ID: <")[1][:3] for t in texts) == [b"fw%d" % n for n in range(5)]
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(dump, ignore_errors=True)


def test_deferral_events_carry_next_attempt_and_error_and_a_delay_warning_goes_out(inprocess_relay, sink):
    target = sink(Behaviour(refuse={"later": "451 4.2.1 mailbox busy"}))
    events = Events()
    relay = inprocess_relay(enable=["forward"], plugins={"events": events},
                            config=forwarding(target.port, retry=["1s"], delay_warning="1s"))
    with smtplib.SMTP("127.0.0.1", relay.port) as client:
        client.sendmail("a@example.test", ["later@far.test"], MSG)
    deferred = wait_until(lambda: [e for e in events.seen if e.name == "message.deferred"], what="a deferral")
    assert deferred[0].data["recipient"] == "later@far.test"
    assert "451 4.2.1 mailbox busy" in deferred[0].data["error"]
    assert deferred[0].data["next_attempt"] > deferred[0].time
    # after the delay_warning age, the sender hears once that delivery is still being tried
    [warning] = target.wait_for(1, timeout=20)
    assert warning.sender == "" and warning.recipients == ["a@example.test"]
    assert warning.message["Subject"].startswith("Delayed Mail") and "Action: delayed" in warning.content.decode()
    time.sleep(2.5)  # more retries fail, but there is only one warning
    assert len(target.received) == 1


def test_forward_to_all_fails_the_whole_message_when_one_recipient_is_refused(inprocess_relay, sink):
    target = sink(Behaviour(refuse={"nobody": "550 5.1.1 no such user"}))
    relay = inprocess_relay(enable=["forward"], config={**forwarding(target.port),
                                                       "forward": {"to": f"127.0.0.1:{target.port}", "recipients": "all"}})
    with smtplib.SMTP("127.0.0.1", relay.port) as client:
        client.sendmail("a@example.test", ["ok@far.test", "nobody@far.test"], MSG)
    [bounce] = target.wait_for(1)  # only the report: ok@ got nothing either
    assert bounce.sender == "" and "ok@far.test" in bounce.content.decode()
    [bad] = wait_until(lambda: relay.spool.ids("bad") or None, what="a .bad envelope")
    assert len(relay.spool.read_envelope(bad, "bad").recipients) == 2


def test_8bit_message_is_refused_by_a_hop_without_8bitmime(inprocess_relay, sink):
    target = sink(Behaviour(eightbitmime=False))
    relay = inprocess_relay(enable=["forward"], config=forwarding(target.port))
    with smtplib.SMTP("127.0.0.1", relay.port) as client:
        client.sendmail("a@example.test", ["x@far.test"], "Subject: café\r\n\r\ncafé\r\n".encode(),
                        mail_options=["BODY=8BITMIME"])
    [bad] = wait_until(lambda: [i for i in relay.spool.ids("bad")
                                if relay.spool.read_envelope(i, "bad").sender] or None, what="a .bad envelope")
    assert "8BITMIME" in relay.spool.read_envelope(bad, "bad").reason
    assert all(r.sender == "" for r in target.received)  # only the (7-bit) report went out


def test_limits_cap_deliveries_in_flight_per_domain(inprocess_relay, sink):
    behaviour = Behaviour(stall_in_data=0.3)
    target = sink(behaviour)
    before = target.handler.connections  # aiosmtpd's Controller probes the port once at start
    relay = inprocess_relay(enable=["forward"], config={
        **forwarding(target.port), "limits": {"far.test": {"connections": 1}}})
    with smtplib.SMTP("127.0.0.1", relay.port) as client:
        for n in range(4):
            client.sendmail("a@example.test", [f"r{n}@far.test"], MSG)
    started = time.monotonic()
    target.wait_for(4, timeout=20)
    # one at a time: four stalls of 0.3 s one after another, on a single connection
    assert time.monotonic() - started >= 0.8
    assert target.handler.connections - before == 1


def test_an_unexpected_error_puts_the_message_back_not_stuck_busy(inprocess_relay, sink, monkeypatch):
    target = sink()
    relay = inprocess_relay(enable=["forward"], config=forwarding(target.port))

    async def broken(*args, **kwargs):
        raise RuntimeError("a bug in outcome handling")

    monkeypatch.setattr(relay.relay.queue, "_record", broken)
    with smtplib.SMTP("127.0.0.1", relay.port) as client:
        client.sendmail("a@example.test", ["x@far.test"], MSG)
    [message_id] = wait_until(lambda: relay.spool.ids() and (relay.spool.directory / f"{relay.spool.ids()[0]}.retry").exists()
                              and relay.spool.ids(), what="the message back in the queue")
    assert not list(relay.spool.directory.glob("*.busy"))
    state = json.loads((relay.spool.directory / f"{message_id}.retry").read_text())
    assert state["next_attempt"] > time.time() + 30
