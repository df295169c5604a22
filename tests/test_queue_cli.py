"""The operator's queue commands, run as `python -m mailrelay queue ...` against real spools:
list, show, retry, delete and bounce, with and without a running relay."""

from __future__ import annotations

import email
import email.policy
import json
import os
import re
import smtplib
import subprocess
import sys
import time
from pathlib import Path


from conftest import wait_until
from mailrelay.queue.claim import claim
from mailrelay.spool import Envelope
from mailrelay_sdk.testing import RunningRelay
from sinks import Behaviour, Sink

MSG = (b"From: a@example.test\r\nTo: x@far.test\r\nSubject: forward me\r\nMessage-ID: <q1@example.test>\r\n"
       b"\r\nsecret body\r\n")
REFUSING = {"later": "451 4.2.1 mailbox busy", "nobody": "550 5.1.1 no such user"}




def queue(spool: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m mailrelay queue ARGS --spool-dir SPOOL`, as an operator runs it."""
    env = {k: v for k, v in os.environ.items() if k != "MAILRELAY_CONFIG"}
    return subprocess.run([sys.executable, "-m", "mailrelay", "queue", *args, "--spool-dir", str(spool)],
                          capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL, env=env)


def ok(spool: Path, *args: str) -> str:
    result = queue(spool, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def listed(spool: Path, *args: str) -> list[dict]:
    return json.loads(ok(spool, "list", "--json", *args))


def send(relay, sender: str, *recipients: str, content: bytes = MSG) -> str:
    """Submit one message; return its spool id (from the 250 reply)."""
    with smtplib.SMTP("127.0.0.1", relay.port) as client:
        client.ehlo("client.test")
        client.mail(sender)
        for recipient in recipients:
            client.rcpt(recipient)
        code, reply = client.data(content)
    assert code == 250
    return reply.decode().rsplit(" ", 1)[1]


def sidecar(spool: Path, message_id: str) -> dict:
    return json.loads((spool / f"{message_id}.retry").read_text())


def files_of(spool: Path, message_id: str) -> list[str]:
    return sorted(p.name[len(message_id):] for p in spool.iterdir() if p.name.startswith(message_id + "."))


def deferred(relay, sender: str = "a@example.test", *recipients: str, content: bytes = MSG) -> str:
    """A message the next hop answered 451 (for later@): waiting an hour for its retry."""
    message_id = send(relay, sender, *recipients or ("later@far.test",), content=content)
    spool = relay.spool.directory
    wait_until(lambda: (spool / f"{message_id}.retry").exists() and (spool / f"{message_id}.envelope").exists(),
               what="a deferred message")
    return message_id


def failed(relay) -> str:
    """A message the next hop answered 550: kept as .bad (its sender got a report)."""
    message_id = send(relay, "a@example.test", "nobody@far.test")
    wait_until(lambda: message_id in relay.spool.ids("bad"), what="a .bad envelope")
    return message_id


def forwarding(target: Sink, **queue_settings) -> dict:
    return {"forward": {"to": f"127.0.0.1:{target.port}"}, "queue": {"retry": ["1h"], **queue_settings}}


def test_list_shows_each_message_with_its_state_oldest_first(inprocess_relay, sink):
    target = sink(Behaviour(refuse=REFUSING))
    relay = inprocess_relay(enable=["forward"], config=forwarding(target))
    spool = relay.spool.directory
    waiting, bad = deferred(relay), failed(relay)
    wait_until(lambda: len(target.received) == 1 and relay.spool.ids() == [waiting],
               what="the report for the 550 to go")

    entries = listed(spool)
    assert [e["id"] for e in entries] == [waiting, bad]
    first, second = entries
    assert first["state"] == "deferred" and first["next_attempt"] > time.time() + 3000
    assert "451 4.2.1 mailbox busy" in first["last_error"] and first["sender"] == "a@example.test"
    assert first["recipient_count"] == 1 and first["size"] == (spool / f"{waiting}.content").stat().st_size
    assert second["state"] == "bad" and second["next_attempt"] is None
    assert "550 5.1.1 no such user" in second["last_error"]
    assert [e["id"] for e in listed(spool, "--state", "bad")] == [bad]

    header, *rows = ok(spool, "list").splitlines()
    assert header.split()[:3] == ["ID", "STATE", "AGE"]
    assert [row.split()[:2] for row in rows] == [[waiting, "deferred"], [bad, "bad"]]
    assert re.search(r"  in (1h\S*|[56]\dm\S*)  ", rows[0])  # an hour, give or take the jitter
    assert "451 4.2.1 mailbox busy" in rows[0] and "a@example.test" in rows[0]
    assert ok(spool, "list", "--state", "busy").strip() == f"no messages (state busy) in {spool}"


def test_show_prints_envelope_attempts_and_headers_but_not_the_body(inprocess_relay, sink):
    target = sink(Behaviour(refuse=REFUSING))
    relay = inprocess_relay(enable=["forward"], config=forwarding(target))
    spool = relay.spool.directory
    content = MSG.replace(b"Subject: forward me", b"Subject: forward me\x1b]0;pwned\x07")
    message_id = deferred(relay, "a@example.test", "ok@far.test", "later@far.test", content=content)

    text = ok(spool, "show", message_id)
    assert f"id:           {message_id}" in text and "state:        deferred" in text
    assert "sender:       a@example.test" in text
    assert "recipient:    later@far.test (remote)" in text
    assert "delivered:    ok@far.test" in text
    assert "client:       127.0.0.1" in text
    assert "attempts:     2" in text
    [attempt] = [line for line in text.splitlines() if " temp " in line]
    assert "later@far.test" in attempt and "451 4.2.1 mailbox busy" in attempt
    assert "next attempt: " in text and " (in " in text
    assert "  Subject: forward me\\x1b]0;pwned\\x07\n" in text  # no terminal escapes from the message
    assert "\x1b" not in text and "secret body" not in text

    details = json.loads(ok(spool, "show", "--json", message_id))
    assert details["recipients"] == [{"address": "later@far.test", "local": False, "mailbox": None,
                                      "delivered": False}]
    assert details["delivered"] == ["ok@far.test"]
    assert [(a["outcome"], a["recipients"]) for a in details["attempts"]] == [("ok", ["ok@far.test"]),
                                                                             ("temp", ["later@far.test"])]
    assert details["next_attempt"] == sidecar(spool, message_id)["next_attempt"]
    assert "Message-ID: <q1@example.test>" in details["headers"] and "secret body" not in details["headers"]


def test_ids_that_could_name_a_path_are_refused_and_nothing_outside_the_spool_is_touched(
        inprocess_relay, tmp_path):
    relay = inprocess_relay()
    spool = relay.spool.directory
    victim = [tmp_path / "victim.content", tmp_path / "victim.envelope", tmp_path / "victim.retry"]
    for path in victim:
        path.write_text("not yours")
    for bad_id in ("../victim", "../../etc/passwd", "/etc/passwd", "..", "a/b"):
        for command in (["show", bad_id], ["delete", bad_id], ["retry", bad_id], ["bounce", bad_id]):
            result = queue(spool, *command)
            assert result.returncode == 1 and result.stdout == ""
            assert result.stderr.strip() == f"Error: {bad_id!r} is not a spool message id"
    assert all(path.read_text() == "not yours" for path in victim)

    result = queue(spool, "show", "emailrelay.1.2.3")
    assert result.returncode == 1
    assert result.stderr.strip() == f"Error: emailrelay.1.2.3: no such message in {spool}"
    result = queue(tmp_path / "nowhere", "list")
    assert result.returncode == 1 and "does not exist" in result.stderr


def test_retry_of_a_deferred_message_makes_the_running_relay_deliver_it(inprocess_relay, sink):
    behaviour = Behaviour(refuse=dict(REFUSING))
    target = sink(behaviour)
    relay = inprocess_relay(enable=["forward"], config=forwarding(target, poll=1))
    spool = relay.spool.directory
    message_id = deferred(relay)
    behaviour.refuse.clear()  # the next hop is fine again, but the relay would wait an hour

    out = ok(spool, "retry", message_id)
    assert out.startswith(f"{message_id}: was deferred until ") and out.strip().endswith("due now")
    [got] = target.wait_for(1, timeout=10)
    assert got.recipients == ["later@far.test"] and got.content.endswith(MSG)
    wait_until(lambda: not list(spool.iterdir()), what="an empty spool")


def test_retry_moves_a_bad_message_back_to_the_queue_keeping_its_attempts(inprocess_relay, sink):
    target = sink(Behaviour(refuse=REFUSING))
    relay = inprocess_relay(enable=["forward"], config=forwarding(target))
    spool = relay.spool.directory
    bad = failed(relay)
    relay.stop()  # the operator works on the spool with the relay stopped
    assert "X-MailRelay-Reason: " in (spool / f"{bad}.envelope.bad").read_text()

    assert ok(spool, "retry", bad).strip() == f"{bad}: moved from bad back to the queue; due now"
    assert files_of(spool, bad) == [".content", ".envelope", ".retry"]
    envelope = Envelope.from_bytes((spool / f"{bad}.envelope").read_bytes())
    assert envelope.reason == "" and envelope.reason_code == ""
    assert b"Reason" not in (spool / f"{bad}.envelope").read_bytes()
    state = sidecar(spool, bad)
    assert state["next_attempt"] == 0 and [a["outcome"] for a in state["attempts"]] == ["perm"]
    [entry] = listed(spool)
    assert entry["state"] == "ready" and entry["next_attempt"] == 0


def test_retry_all_makes_every_deferred_and_bad_message_due(inprocess_relay, sink):
    target = sink(Behaviour(refuse=REFUSING))
    relay = inprocess_relay(enable=["forward"], config=forwarding(target))
    spool = relay.spool.directory
    waiting, bad = deferred(relay), failed(relay)
    wait_until(lambda: len(target.received) == 1 and relay.spool.ids() == [waiting],
               what="the report for the 550 to go")
    relay.stop()

    assert ok(spool, "retry", "--all").strip() == "retried 2 message(s): 1 deferred, 1 bad"
    assert {e["id"]: e["state"] for e in listed(spool)} == {waiting: "ready", bad: "ready"}
    assert sidecar(spool, waiting)["next_attempt"] == 0 and sidecar(spool, bad)["next_attempt"] == 0
    assert ok(spool, "retry", "--all").strip() == "nothing to retry"
    result = queue(spool, "retry")
    assert result.returncode == 2 and "give either a message ID or --all" in result.stderr


def test_delete_removes_every_file_of_a_message(inprocess_relay, sink):
    target = sink(Behaviour(refuse=REFUSING))
    relay = inprocess_relay(enable=["forward"], config=forwarding(target))
    spool = relay.spool.directory
    waiting, bad = deferred(relay), failed(relay)
    assert files_of(spool, waiting) == [".content", ".envelope", ".retry"]
    assert files_of(spool, bad) == [".content", ".envelope.bad", ".retry"]

    assert ok(spool, "delete", waiting).strip() == f"{waiting}: deleted (was deferred)"
    assert ok(spool, "delete", bad).strip() == f"{bad}: deleted (was bad)"
    assert files_of(spool, waiting) == [] and files_of(spool, bad) == []
    result = queue(spool, "delete", waiting)
    assert result.returncode == 1 and "no such message" in result.stderr


def test_a_message_being_forwarded_is_left_alone(inprocess_relay):
    relay = inprocess_relay()  # no delivery plugin: messages wait in the spool, ready
    spool = relay.spool.directory
    message_id = send(relay, "a@example.test", "x@far.test")
    claimed = claim(spool, message_id)  # exactly what a queue runner does while forwarding
    assert claimed is not None
    try:
        [entry] = listed(spool)
        assert entry["state"] == "busy"
        for command in ("retry", "delete", "bounce"):
            result = queue(spool, command, message_id)
            assert result.returncode == 1, command
            assert "being forwarded now" in result.stderr and result.stdout == ""
        assert files_of(spool, message_id) == [".content", ".envelope.busy"]
    finally:
        claimed.release()
    assert ok(spool, "retry", message_id).strip() == f"{message_id}: already due; it goes at the next scan"
    assert ok(spool, "delete", message_id).strip() == f"{message_id}: deleted (was ready)"
    assert list(spool.iterdir()) == []


def test_bounce_reports_to_the_sender_and_keeps_the_message_as_bad(inprocess_relay, sink):
    target = sink(Behaviour(refuse=REFUSING))
    relay = inprocess_relay(enable=["forward"], config=forwarding(target))
    spool = relay.spool.directory
    message_id = deferred(relay)
    relay.stop()

    out = ok(spool, "bounce", message_id, "--domain", "relay.test").strip()
    assert out.startswith(f"{message_id}: report to <a@example.test> for 1 recipient(s) queued as ")
    assert out.endswith("; marked bad")
    report_id = out.split("queued as ")[1].split(";")[0]
    assert files_of(spool, message_id) == [".content", ".envelope.bad", ".retry"]
    assert Envelope.from_bytes((spool / f"{message_id}.envelope.bad").read_bytes()).reason == "bounced by operator"
    # The report is an ordinary queued message from the null sender to the original sender ...
    assert files_of(spool, report_id) == [".content", ".envelope"]
    report_envelope = Envelope.from_bytes((spool / f"{report_id}.envelope").read_bytes())
    assert report_envelope.sender == "" and [r.address for r in report_envelope.recipients] == ["a@example.test"]
    assert [(e["id"], e["state"]) for e in listed(spool)] == [(message_id, "bad"), (report_id, "ready")]

    # ... which the relay sends when it runs again.
    with RunningRelay(spool, enable=["forward"], config=forwarding(target)):
        [report] = target.wait_for(1, timeout=10)
        wait_until(lambda: files_of(spool, report_id) == [], what="the report to leave the spool")
    assert report.sender == "" and report.recipients == ["a@example.test"]
    assert f"X-MailRelay-Id: {message_id}" in report.content.decode()
    message = email.message_from_bytes(report.content, policy=email.policy.default)
    assert message["From"].addresses[0].addr_spec == "MAILER-DAEMON@relay.test"
    assert message.get_content_type() == "multipart/report"
    status = str(message.get_payload()[1])
    assert "Final-Recipient: rfc822; later@far.test" in status and "Action: failed" in status
    assert "Status: 5.0.0" in status and "451 4.2.1 mailbox busy" in status
    assert "Subject: forward me" in str(message.get_payload()[2]) and b"secret body" not in report.content

    result = queue(spool, "bounce", message_id)
    assert result.returncode == 1 and "already bounced" in result.stderr
    assert "reason:       bounced by operator" in ok(spool, "show", message_id)


def test_a_bounce_is_never_bounced_only_marked_bad(inprocess_relay, sink):
    target = sink(Behaviour(refuse=REFUSING))
    relay = inprocess_relay(enable=["forward"], config=forwarding(target))
    spool = relay.spool.directory
    message_id = deferred(relay, sender="<>")

    out = ok(spool, "bounce", message_id).strip()
    assert out == (f"{message_id}: not reported: the sender is the null reverse-path (it is a report itself); "
                   "marked bad")
    assert [e["id"] for e in listed(spool)] == [message_id]  # no report was queued
    assert files_of(spool, message_id) == [".content", ".envelope.bad", ".retry"]
    reason = Envelope.from_bytes((spool / f"{message_id}.envelope.bad").read_bytes()).reason
    assert reason.startswith("bounced by operator") and "null reverse-path" in reason
    assert target.received == []


def test_the_spool_is_found_from_the_configuration_like_the_daemon(inprocess_relay, tmp_path):
    relay = inprocess_relay()
    message_id = send(relay, "a@example.test", "x@far.test")
    conf = tmp_path / "relay.conf"
    conf.write_text(f'[spool]\ndir = "{relay.spool.directory}"\n')
    env = {k: v for k, v in os.environ.items() if k != "MAILRELAY_CONFIG"}
    for args in (["queue", "list", "--json", "--config", str(conf)],
                 ["--config", str(conf), "queue", "list", "--json"],
                 ["--spool-dir", str(relay.spool.directory), "queue", "list", "--json"]):
        result = subprocess.run([sys.executable, "-m", "mailrelay", *args], capture_output=True, text=True,
                                timeout=30, env=env)
        assert result.returncode == 0, result.stderr
        assert [e["id"] for e in json.loads(result.stdout)] == [message_id], args
