"""The pickup directory: applications drop complete files the maildir way (tmp/, then rename into
new/); a running relay queues them through the same policies, filters and commit as SMTP."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from mailrelay.spool import Envelope

from conftest import spooled_contents, wait_until

FILTER = '''#!{python}
import os
from mailrelay_sdk import script


def check(mail):
    if "reject-me" in mail.headers.get("Subject", ""):
        return script.reject("Not this one", code=550)
    if os.path.exists("{flag}"):
        return script.tempfail("Not now")
    return None


script.main(check)
'''


def drop(pickup: Path, name: str, content: bytes, sidecar: dict | str | None = None) -> None:
    """Write the maildir way: into tmp/, then rename into new/ (a sidecar goes first)."""
    if sidecar is not None:
        text = sidecar if isinstance(sidecar, str) else json.dumps(sidecar)
        (pickup / "tmp" / f"{name}.json").write_text(text)
        os.rename(pickup / "tmp" / f"{name}.json", pickup / "new" / f"{name}.json")
    (pickup / "tmp" / name).write_bytes(content)
    os.rename(pickup / "tmp" / name, pickup / "new" / name)


def envelopes(spool: Path) -> list[Envelope]:
    paths = sorted(spool.glob("*.envelope"), key=lambda p: int(p.name.split(".")[-2]))
    return [Envelope.from_bytes(p.read_bytes()) for p in paths]


@pytest.fixture
def pickup_relay(relay_process, tmp_path):
    """A relay watching tmp_path/pickup (created by the relay), with a pipe: filter that rejects
    "reject-me" subjects and answers 451 while tmp_path/busy exists."""
    pickup = tmp_path / "pickup"
    script = tmp_path / "check.py"
    script.write_text(FILTER.format(python=sys.executable, flag=tmp_path / "busy"))
    script.chmod(0o755)
    conf = tmp_path / "relay.conf"
    conf.write_text(f'[pickup]\ndir = "{pickup}"\ninterval = 0.2\nretry = 1\n\n'
                    f'[filters]\nserver = ["pipe:{script}"]\n\n[smtp]\nsize = 4096\n')
    relay = relay_process("-c", str(conf))
    wait_until(lambda: (pickup / "new").is_dir() and (pickup / "tmp").is_dir(), what="the pickup directories")
    return relay, pickup


def test_a_dropped_message_is_queued_with_the_envelope_from_its_headers(pickup_relay):
    relay, pickup = pickup_relay
    started = time.monotonic()
    drop(pickup, "order-1", b"From: Shop <shop@example.com>\nTo: alice@example.org\nCc: bob@example.org\n"
                            b"Bcc: audit@example.org\nSubject: Receipt\n\nTotal: 10\n")
    [envelope] = wait_until(lambda: envelopes(relay.spool), what="the message in the spool")
    assert time.monotonic() - started < 3  # noticed within a second or so
    [content] = spooled_contents(relay.spool)
    assert envelope.sender == "shop@example.com"
    assert [r.address for r in envelope.recipients] == ["alice@example.org", "bob@example.org", "audit@example.org"]
    assert envelope.client == "127.0.0.1"
    assert content.startswith(b"Received: from pickup ([127.0.0.1]) by relay.test with ESMTP")
    assert b"Bcc" not in content and content.endswith(b"Subject: Receipt\r\n\r\nTotal: 10\r\n")
    wait_until(lambda: not any((pickup / "new").iterdir()), what="the file to be removed")
    assert list((pickup / "bad").iterdir()) == []


def test_return_path_and_sender_name_the_envelope_sender(pickup_relay):
    relay, pickup = pickup_relay
    drop(pickup, "a", b"Return-Path: <bounces@example.com>\nSender: list@example.com\nFrom: x@example.com\n"
                      b"To: alice@example.org\nSubject: a\n\nbody\n")
    drop(pickup, "b", b"Sender: list@example.com\nFrom: x@example.com\nTo: alice@example.org\nSubject: b\n\nbody\n")
    wait_until(lambda: len(envelopes(relay.spool)) == 2, what="both messages")
    assert sorted(e.sender for e in envelopes(relay.spool)) == ["bounces@example.com", "list@example.com"]
    assert all(b"Return-Path" not in c for c in spooled_contents(relay.spool))


def test_a_json_sidecar_gives_the_envelope(pickup_relay):
    relay, pickup = pickup_relay
    drop(pickup, "with-sidecar", b"From: shop@example.com\nTo: everyone@example.org\nSubject: s\n\nbody\n",
         sidecar={"from": "", "to": ["one@example.org", "two@example.org"]})
    [envelope] = wait_until(lambda: envelopes(relay.spool), what="the message")
    assert envelope.sender == "" and [r.address for r in envelope.recipients] == ["one@example.org",
                                                                                "two@example.org"]
    wait_until(lambda: not any((pickup / "new").iterdir()), what="file and sidecar to be removed")


@pytest.mark.parametrize("content, sidecar, reason", [
    (b"\x00\x01 binary junk\n", None, "not an RFC 5322 message"),
    (b"From: shop@example.com\nSubject: to whom?\n\nbody\n", None, "no recipients: no To, Cc or Bcc header"),
    (b"To: alice@example.org\nSubject: from whom?\n\nbody\n", None, "no sender: no Return-Path, Sender or From"),
    (b"From: shop@example.com\nTo: a@example.org\n\nbody\n", "{not json", "sidecar broken.json is not valid JSON"),
    (b"From: shop@example.com\nTo: a@example.org\n\nbody\n", {"rcpt": ["x@example.org"]},
     'sidecar: expected a JSON object with "from" and/or "to" only'),
    (b"From: shop@example.com\nTo: a@example.org\nSubject: big\n\n" + b"x" * 5000 + b"\n", None,
     "552 5.3.4 Message size exceeds fixed maximum message size (4096 octets)"),
    (b"From: shop@example.com\nTo: a@example.org\nSubject: reject-me\n\nbody\n", None, "550 5.7.1 Not this one"),
    (b"From: shop@example.com\nTo: not-an-address\nSubject: s\n\nbody\n", None, "501 5.1.3"),
])
def test_a_bad_file_moves_to_bad_with_its_reason(pickup_relay, content, sidecar, reason):
    relay, pickup = pickup_relay
    drop(pickup, "broken", content, sidecar)
    wait_until(lambda: (pickup / "bad" / "broken.reason").exists(), what="the file in bad/")
    assert reason in (pickup / "bad" / "broken.reason").read_text()
    assert (pickup / "bad" / "broken").read_bytes() == content  # kept as written, never dropped
    if sidecar is not None:
        assert (pickup / "bad" / "broken.json").exists()
    assert list((pickup / "new").iterdir()) == [] and spooled_contents(relay.spool) == []
    relay.stop()
    assert "pickup: broken moved to" in relay.log


def test_a_temporary_refusal_leaves_the_file_for_a_later_try(pickup_relay, tmp_path):
    relay, pickup = pickup_relay
    (tmp_path / "busy").touch()
    drop(pickup, "later", b"From: shop@example.com\nTo: a@example.org\nSubject: s\n\nbody\n")
    wait_until(lambda: "pickup: later refused for now" in relay.log, what="the temporary refusal")
    time.sleep(0.5)
    assert (pickup / "new" / "later").exists() and list((pickup / "bad").iterdir()) == []
    (tmp_path / "busy").unlink()
    wait_until(lambda: envelopes(relay.spool), timeout=10, what="the retry to queue it")
    wait_until(lambda: not (pickup / "new" / "later").exists(), what="the file to be removed")


def test_unfinished_and_hidden_files_are_left_alone_and_links_never_followed(pickup_relay):
    relay, pickup = pickup_relay
    message = b"From: shop@example.com\nTo: a@example.org\nSubject: s\n\nbody\n"
    (pickup / "tmp" / "being-written").write_bytes(message)
    (pickup / "new" / ".hidden").write_bytes(message)
    os.symlink(pickup / "tmp" / "being-written", pickup / "new" / "link")
    drop(pickup, "marker", message)
    wait_until(lambda: envelopes(relay.spool) and not (pickup / "new" / "marker").exists(), what="the marker file")
    assert len(spooled_contents(relay.spool)) == 1
    assert sorted(p.name for p in (pickup / "new").iterdir()) == [".hidden"]
    assert (pickup / "tmp" / "being-written").exists()
    # A symbolic link is never followed: it is set aside, the file it names untouched.
    wait_until(lambda: (pickup / "bad" / "link.reason").exists(), what="the link in bad/")
    assert "not a regular file" in (pickup / "bad" / "link.reason").read_text()
    assert (pickup / "bad" / "link").is_symlink()


def test_picked_up_mail_is_forwarded_at_once(relay_process, sink, tmp_path):
    next_hop = sink()
    pickup = tmp_path / "pickup"
    conf = tmp_path / "relay.conf"
    conf.write_text(f'[pickup]\ndir = "{pickup}"\n')
    relay_process("-c", str(conf), "--forward-to", f"127.0.0.1:{next_hop.port}")
    wait_until(lambda: (pickup / "new").is_dir(), what="the pickup directory")
    started = time.monotonic()
    drop(pickup, "urgent", b"From: app@example.com\nTo: oncall@example.org\nSubject: disk full\n\nsee logs\n")
    [forwarded] = next_hop.wait_for(1)
    assert time.monotonic() - started < 5
    assert (forwarded.sender, forwarded.recipients) == ("app@example.com", ["oncall@example.org"])


def test_pickup_without_a_directory_is_a_start_up_error(relay_process, tmp_path):
    conf = tmp_path / "relay.conf"
    conf.write_text('[pickup]\ndir = "relative/path"\n')
    relay = relay_process("-c", str(conf), wait=False)
    assert relay.proc.wait(30) == 1
    assert "[pickup] dir: the pickup plugin needs the absolute path" in relay.log
