"""`relay-sendmail`: the sendmail(1) command line that applications and cron call, with sysexits codes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mailrelay.spool import Envelope

SENDMAIL = str(Path(sys.executable).parent / "relay-sendmail")
EX_USAGE, EX_DATAERR, EX_NOUSER, EX_UNAVAILABLE, EX_CONFIG = 64, 65, 67, 69, 78


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path]:
    """A relay.conf naming a spool and the relay's domain, as $MAILRELAY_CONFIG."""
    spool = tmp_path / "spool"
    spool.mkdir()
    conf = tmp_path / "relay.conf"
    conf.write_text(f'[spool]\ndir = "{spool}"\n\n[server]\ndomain = "host.example"\n')
    return conf, spool


def sendmail(conf: Path | None, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    env = {"PATH": os.environ["PATH"], "HOME": "/nonexistent", "USER": "cron", "LOGNAME": "cron"}
    if conf is not None:
        env["MAILRELAY_CONFIG"] = str(conf)
    return subprocess.run([SENDMAIL, *args], input=stdin, capture_output=True, timeout=60, env=env)


def only_message(spool: Path) -> tuple[Envelope, bytes]:
    [envelope_path] = spool.glob("*.envelope")
    content = envelope_path.with_name(envelope_path.name.replace(".envelope", ".content")).read_bytes()
    return Envelope.from_bytes(envelope_path.read_bytes()), content


def test_minus_t_takes_recipients_from_the_headers_and_drops_bcc(setup):
    conf, spool = setup
    message = (b"From: Shop <shop@example.com>\nTo: alice@example.org\nCc: bob@example.org\n"
               b"Bcc: audit@example.org,\n  second-audit@example.org\nSubject: Receipt\n\nTotal: 10\n")
    result = sendmail(None, "-C", str(conf), "-t", "-i", "extra@example.org", stdin=message)
    assert result.returncode == 0, result.stderr
    envelope, content = only_message(spool)
    assert envelope.sender == "cron@host.example"   # no -f: the user's login at the relay's domain
    assert [r.address for r in envelope.recipients] == ["extra@example.org", "alice@example.org",
                                                       "bob@example.org", "audit@example.org",
                                                       "second-audit@example.org"]
    assert b"Bcc" not in content and b"audit@" not in content
    assert b"\r\nDate: " in content and b"\r\nMessage-ID: <" in content  # added: the app sent none
    assert b"From: Shop <shop@example.com>\r\n" in content and content.endswith(b"\r\n\r\nTotal: 10\r\n")


def test_sender_full_name_and_missing_from(setup):
    conf, spool = setup
    result = sendmail(conf, "-f", "robot@example.com", "-F", "Build Robot", "dev@example.org",
                      stdin=b"Subject: build failed\n\nlog follows\n")
    assert result.returncode == 0, result.stderr
    envelope, content = only_message(spool)
    assert envelope.sender == "robot@example.com"
    assert b"From: Build Robot <robot@example.com>\r\n" in content


def test_a_lone_dot_ends_the_message_unless_minus_i(setup):
    conf, spool = setup
    body = b"Subject: dots\n\nfirst\n.\nafter the dot\n"
    assert sendmail(conf, "a@example.org", stdin=body).returncode == 0
    _, content = only_message(spool)
    assert content.endswith(b"first\r\n") and b"after the dot" not in content
    for path in spool.iterdir():
        path.unlink()
    assert sendmail(conf, "-oi", "a@example.org", stdin=body).returncode == 0
    _, content = only_message(spool)
    assert content.endswith(b"first\r\n.\r\nafter the dot\r\n")


def test_crons_command_line(setup):
    """cron runs: sendmail -FCronDaemon -i -B8BITMIME -oem USER (a bare local name)."""
    conf, spool = setup
    result = sendmail(conf, "-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root",
                      stdin=b"Subject: Cron <root@host> backup\n\nok\n")
    assert result.returncode == 0, result.stderr
    envelope, content = only_message(spool)
    assert [r.address for r in envelope.recipients] == ["root@host.example"]
    assert b"From: CronDaemon <cron@host.example>\r\n" in content


def test_a_message_without_headers_is_all_body(setup):
    """`echo "backup done" | sendmail root` gets a header section of its own."""
    conf, spool = setup
    assert sendmail(conf, "root", stdin=b"backup done\nno errors\n").returncode == 0
    _, content = only_message(spool)
    head, _, body = content.partition(b"\r\n\r\n")
    assert b"\r\nFrom: cron@host.example\r\nDate: " in head and body == b"backup done\r\nno errors\r\n"


def test_null_sender_and_comma_separated_recipients(setup):
    conf, spool = setup
    assert sendmail(conf, "-f", "<>", "a@example.org, b@example.org", stdin=b"Subject: x\n\ny\n").returncode == 0
    envelope, _ = only_message(spool)
    assert envelope.sender == "" and [r.address for r in envelope.recipients] == ["a@example.org", "b@example.org"]


@pytest.mark.parametrize("args, stdin, code, error", [
    ((), b"Subject: x\n\ny\n", EX_USAGE, "no recipient addresses (give them as arguments, or -t"),
    (("-t",), b"Subject: x\n\ny\n", EX_USAGE, "no recipient addresses"),
    (("a@b@c",), b"Subject: x\n\ny\n", EX_NOUSER, "recipient <a@b@c>"),
    (("-f", "bad sender@", "a@example.org"), b"Subject: x\n\ny\n", EX_DATAERR, "sender <bad sender@>"),
    (("-bp",), b"", EX_USAGE, "-bp: not supported"),
    (("-q",), b"", EX_USAGE, "-q: not supported"),
    (("-Z",), b"", EX_USAGE, "option -Z not recognized"),
])
def test_refusals_exit_with_sysexits_codes(setup, args, stdin, code, error):
    conf, spool = setup
    result = sendmail(conf, *args, stdin=stdin)
    assert result.returncode == code, result.stderr
    assert error in result.stderr.decode()
    assert list(spool.iterdir()) == []


def test_configuration_problems_are_ex_config(tmp_path):
    missing = sendmail(None, "-C", str(tmp_path / "nothing.conf"), "a@example.org", stdin=b"Subject: x\n\ny\n")
    assert missing.returncode == EX_CONFIG
    conf = tmp_path / "relay.conf"
    conf.write_text(f'[spool]\ndir = "{tmp_path / "no-spool"}"\n')
    no_spool = sendmail(conf, "a@example.org", stdin=b"Subject: x\n\ny\n")
    assert no_spool.returncode == EX_CONFIG and "does not exist" in no_spool.stderr.decode()


def test_newaliases_mode_is_a_no_op(setup):
    assert sendmail(setup[0], "-bi").returncode == 0


def test_minus_bs_speaks_smtp_through_the_running_relay(relay_process, tmp_path):
    relay = relay_process()
    conf = tmp_path / "relay.conf"
    conf.write_text(f'[spool]\ndir = "{relay.spool}"\n\n[smtp]\nport = {relay.port}\n')
    proc = subprocess.Popen([SENDMAIL, "-bs"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            env={"PATH": os.environ["PATH"], "MAILRELAY_CONFIG": str(conf)})
    assert proc.stdin is not None and proc.stdout is not None

    def say(line: bytes) -> bytes:
        proc.stdin.write(line + b"\r\n")
        proc.stdin.flush()
        return read_reply()

    def read_reply() -> bytes:
        lines = []
        while True:
            line = proc.stdout.readline()
            lines.append(line)
            if len(line) < 4 or line[3:4] != b"-":
                return b"".join(lines)

    assert read_reply().startswith(b"220 ")
    assert b"250" in say(b"EHLO app.example")
    assert say(b"MAIL FROM:<app@example.com>").startswith(b"250")
    assert say(b"RCPT TO:<alice@example.org>").startswith(b"250")
    assert say(b"DATA").startswith(b"354")
    reply = say(b"Subject: over stdio\r\n\r\nhello\r\n.")
    assert reply.startswith(b"250 2.0.0 OK queued as emailrelay.")
    assert say(b"QUIT").startswith(b"221")
    assert proc.wait(10) == 0
    message_id = reply.split()[-1].decode()
    content = (relay.spool / f"{message_id}.content").read_bytes()
    # The relay received it as an SMTP client on this host: all its policies applied.
    assert content.startswith(b"Received: from app.example ([127.0.0.1]) by relay.test with ESMTP")
    assert content.endswith(b"Subject: over stdio\r\n\r\nhello\r\n")


def test_minus_bs_without_a_running_relay_is_ex_unavailable(setup):
    conf, spool = setup
    conf.write_text(conf.read_text() + "\n[smtp]\nport = 1\n")
    started = time.monotonic()
    result = sendmail(conf, "-bs", stdin=b"EHLO x\r\n")
    assert result.returncode == EX_UNAVAILABLE and "no relay is listening" in result.stderr.decode()
    assert time.monotonic() - started < 15
