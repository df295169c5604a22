"""Address verifiers (--address-verifier) through a real relay: E-MailRelay's contract, end to end.

Verifiers are real shell scripts, a real line server (net:) and real system accounts (account:).
"""

from __future__ import annotations

import os
import pwd
import smtplib
import socketserver
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from conftest import SHARED, free_port, require, wait_until
from smtpwire import Wire
from mailrelay.spool import Spool
from mailrelay_plugins.verifier import CANNOT_VERIFY, Outcome, outcome_from_line, outcome_from_program

BODY = b"Subject: verified\r\n\r\nhello\r\n"


def script(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return str(path)


@pytest.fixture
def verifier(tmp_path) -> str:
    """One verifier script for every exit code, chosen by the recipient's local part; it records
    its arguments (one per line) in args/<recipient>."""
    (tmp_path / "args").mkdir()
    return script(tmp_path / "verify.sh", f"""
printf '%s\\n' "$@" > "{tmp_path}/args/$1"
case "$1" in
  alice@*) echo "Alice Example"; echo "alice"; exit 0;;
  alias@*) echo ""; echo "Target@Elsewhere.test"; exit 1;;
  broken-alias@*) echo ""; echo "not an address"; exit 1;;
  bad@*) echo "no such user here"; echo "for the log only"; exit 2;;
  busy@*) echo "mailbox busy, try later"; exit 3;;
  odd@*) echo "odd exit code"; exit 42;;
  silent@*) exit 2;;
  half@*) echo "only one line"; exit 0;;
  abort@*) exit 100;;
  crash@*) kill -9 $$;;
  *) echo ""; echo "$1"; exit 1;;
esac
""")


def rcpt_replies(port: int, recipients: list[str], sender: str = "sender@outside.test") -> list[tuple[int, str]]:
    with Wire(port) as wire:
        wire.greet()
        assert wire.cmd(f"MAIL FROM:<{sender}>")[0] == 250
        return [wire.cmd(f"RCPT TO:<{r}>") for r in recipients]


def send(port: int, recipients: list[str]) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.sendmail("sender@outside.test", recipients, BODY)


def only_envelope(spool_dir: Path):
    spool = Spool(spool_dir)
    [message_id] = spool.ids()
    return spool.read_envelope(message_id), (spool_dir / f"{message_id}.envelope").read_bytes()


# ---------------------------------------------------------------- a program verifier
def test_each_exit_code_gives_its_reply(relay_process, verifier):
    relay = relay_process("--address-verifier", verifier)
    replies = rcpt_replies(relay.port, ["alice@local.test", "remote@far.test", "bad@local.test",
                                        "busy@local.test", "odd@local.test", "silent@local.test",
                                        "half@local.test", "crash@local.test"])
    assert replies == [
        (250, "2.1.5 Recipient OK"),
        (250, "2.1.5 Recipient OK"),
        (550, "5.1.1 no such user here"),
        (450, "4.2.0 mailbox busy, try later"),
        (450, "4.3.0 cannot verify the address now"),  # another code: a broken verifier, not a bad address
        (550, "5.1.1 mailbox unavailable"),    # no text: E-MailRelay's default
        (450, "4.3.0 cannot verify the address now"),  # a 0 without the mailbox line: broken too
        (450, "4.3.0 cannot verify the address now"),  # a crashed verifier is our fault
    ]
    assert "for the log only" in relay.log and "verifier killed by signal 9" in relay.log
    assert "verifier broke its contract: exit code" in relay.log


def test_the_verifier_gets_emailrelays_six_arguments(relay_process, verifier, tmp_path):
    relay = relay_process("--address-verifier", verifier)
    with Wire(relay.port) as wire:
        wire.greet()
        wire.cmd("MAIL FROM:<sender@outside.test>")
        wire.cmd("RCPT TO:<someone@far.test>")
        client_port = wire.sock.getsockname()[1]
    args = (tmp_path / "args" / "someone@far.test").read_text().split("\n")
    assert args == ["someone@far.test", "sender@outside.test", f"127.0.0.1:{client_port}", "relay.test",
                    "none", "", ""]


def test_a_local_mailbox_is_recorded_as_to_local(relay_process, verifier):
    relay = relay_process("--address-verifier", verifier)
    send(relay.port, ["alice@local.test", "friend@far.test"])
    envelope, raw = only_envelope(relay.spool)
    assert [(r.address, r.mailbox) for r in envelope.recipients] == [("alice", "alice"), ("friend@far.test", None)]
    assert b"X-MailRelay-To-Local: alice\r\n" in raw and b"X-MailRelay-To-Remote: friend@far.test\r\n" in raw


def test_a_rewritten_remote_address_is_spooled(relay_process, verifier):
    relay = relay_process("--address-verifier", verifier)
    send(relay.port, ["alias@local.test"])
    envelope, raw = only_envelope(relay.spool)
    assert [r.address for r in envelope.recipients] == ["Target@Elsewhere.test"]
    assert b"X-MailRelay-To-Remote: Target@Elsewhere.test\r\n" in raw


def test_a_rewrite_to_a_non_address_is_a_temporary_failure(relay_process, verifier):
    relay = relay_process("--address-verifier", verifier)
    assert rcpt_replies(relay.port, ["broken-alias@local.test"]) == [(450, "4.3.0 cannot verify the address now")]
    assert "rewrote <broken-alias@local.test> to an invalid address" in relay.log


def test_exit_100_drops_the_connection(relay_process, verifier):
    relay = relay_process("--address-verifier", verifier)
    with Wire(relay.port) as wire:
        wire.greet()
        wire.cmd("MAIL FROM:<sender@outside.test>")
        assert wire.cmd("RCPT TO:<abort@local.test>")[0] == 421
        assert wire.closed()


def test_a_hanging_verifier_is_killed_and_answers_450(relay_process, tmp_path):
    pid_file = tmp_path / "verifier.pid"
    hang = script(tmp_path / "hang.sh", f"echo $$ > {pid_file}\nsleep 60 &\necho $! >> {pid_file}\nwait\n")
    conf = tmp_path / "relay.conf"
    # A verifier timeout longer than the general hook limit: the verifier's own limit decides.
    conf.write_text("[plugins]\nhook_timeout = 0.5\n[verifier]\ntimeout = 1.5\n")
    relay = relay_process("-c", str(conf), "--address-verifier", hang)
    started = time.monotonic()
    assert rcpt_replies(relay.port, ["anyone@local.test"]) == [(450, "4.3.0 address verifier timed out")]
    assert 1.4 < time.monotonic() - started < 6
    for pid in map(int, pid_file.read_text().split()):  # the script and the sleep it started
        wait_until(lambda: not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2],
                   timeout=5, what=f"verifier process {pid} to be killed")


def test_the_filter_timeout_is_the_verifier_timeout_too(relay_process, tmp_path):
    hang = script(tmp_path / "hang.sh", "sleep 60\n")
    relay = relay_process("--address-verifier", hang, "--filter-timeout", "1")
    started = time.monotonic()
    assert rcpt_replies(relay.port, ["anyone@local.test"])[0][0] == 450
    assert time.monotonic() - started < 6


@pytest.mark.parametrize("program, problem", [
    ("/nonexistent/verifier", "is not an executable file"),
    ("net:localhost", "expected net:HOST:PORT"),
    ("account:2000-1000", "is not a uid range"),
    ("account:frobnicate", "unknown option 'frobnicate'"),
    ("exit:x", "not a numeric exit code"),
])
def test_a_bad_verifier_stops_start_up(relay_process, program, problem):
    relay = relay_process("--address-verifier", program, wait=False)
    assert relay.proc.wait(30) == 1
    assert problem in relay.log


# ---------------------------------------------------------------- E-MailRelay's own example, with deliver:
def test_emailrelays_example_verifier_works_unmodified_with_deliver(relay_process):
    example = SHARED / "emailrelay-spool" / "verifier.sh"
    relay = relay_process("--address-verifier", str(example), "--filter", "deliver:")
    assert rcpt_replies(relay.port, ["bad@local.test"]) == [(550, "5.1.1 no such user")]
    send(relay.port, ["alice@local.test"])  # local only: delivered, nothing left to forward
    [delivered] = (relay.spool / "alice" / "new").iterdir()
    assert delivered.read_bytes().endswith(BODY)
    assert Spool(relay.spool).ids() == []
    send(relay.port, ["postmaster@local.test", "far@remote.test"])  # mixed: the remote part stays
    assert len(list((relay.spool / "postmaster" / "new").iterdir())) == 1
    envelope, _ = only_envelope(relay.spool)
    assert [r.address for r in envelope.recipients] == ["far@remote.test"]


# ---------------------------------------------------------------- relay control after the verifier
def test_a_verifier_with_relay_control_for_an_outsider(relay_process, verifier, tmp_path):
    conf = tmp_path / "relay.conf"
    conf.write_text('[relay]\nlocal_domains = ["local.test"]\nnetworks = []\n')
    relay = relay_process("-c", str(conf), "--remote-clients", "--interface", "127.0.0.1",
                          "--address-verifier", verifier)
    replies = rcpt_replies(relay.port, ["alice@local.test", "alias@local.test", "remote@far.test",
                                        "bad@local.test", "alice@far.test"])
    assert replies == [(250, "2.1.5 Recipient OK"),     # local mailbox
                       (250, "2.1.5 Recipient OK"),     # a local address; the verifier's rewrite is kept
                       (550, "5.7.1 Relaying denied"),  # "valid remote" to the verifier, still no relay
                       (550, "5.1.1 no such user here"),
                       (250, "2.1.5 Recipient OK")]     # a local mailbox at any domain: the verifier says so
    send(relay.port, ["alias@local.test"])
    envelope, _ = only_envelope(relay.spool)
    assert [r.address for r in envelope.recipients] == ["Target@Elsewhere.test"]


# ---------------------------------------------------------------- net:
class LineVerifier(socketserver.ThreadingTCPServer):
    """A verifier daemon: answers each request line from a table keyed by the recipient's local part."""

    daemon_threads = True
    allow_reuse_address = True
    ANSWERS = {"alice": "0|alice|Alice Example", "alias": "1|target@elsewhere.test", "bad": "2|no such user|why",
               "busy": "3|try later", "abort": "100", "junk": "what?"}

    def __init__(self) -> None:
        self.requests: list[list[str]] = []
        self.connections = 0
        self.one_shot = False
        server = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                server.connections += 1
                for line in self.rfile:
                    fields = line.decode().rstrip("\n").split("|")
                    server.requests.append(fields)
                    if fields[0].startswith("hang@"):
                        time.sleep(3)
                        return
                    answer = server.ANSWERS.get(fields[0].split("@")[0], "1|")
                    self.wfile.write(answer.encode() + b"\n")
                    if server.one_shot:
                        return

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


@pytest.fixture
def line_verifier() -> Iterator[LineVerifier]:
    server = LineVerifier()
    yield server
    server.shutdown()
    server.server_close()


def test_a_network_verifier(relay_process, line_verifier, tmp_path):
    conf = tmp_path / "relay.conf"
    conf.write_text("[verifier]\ntimeout = 1\n")
    relay = relay_process("-c", str(conf), "--address-verifier", f"net:127.0.0.1:{line_verifier.server_address[1]}")
    replies = rcpt_replies(relay.port, ["alice@local.test", "bad@local.test", "busy@local.test", "junk@local.test",
                                        "other@far.test"])
    assert replies == [(250, "2.1.5 Recipient OK"), (550, "5.1.1 no such user"), (450, "4.2.0 try later"),
                       (450, "4.3.0 cannot verify the address now"), (250, "2.1.5 Recipient OK")]
    assert line_verifier.connections == 1  # one kept-open connection for all requests
    assert line_verifier.requests[0][:2] == ["alice@local.test", "sender@outside.test"]
    assert line_verifier.requests[0][3:] == ["relay.test", "none", ""]
    send(relay.port, ["alice@local.test", "alias@local.test"])
    envelope, _ = only_envelope(relay.spool)
    assert [(r.address, r.mailbox) for r in envelope.recipients] == [("alice", "alice"),
                                                                     ("target@elsewhere.test", None)]
    assert rcpt_replies(relay.port, ["hang@local.test"]) == [(450, "4.3.0 cannot verify")]
    assert rcpt_replies(relay.port, ["alice@local.test"]) == [(250, "2.1.5 Recipient OK")]  # a new connection


def test_a_network_verifier_that_is_down_is_a_temporary_failure(relay_process):
    relay = relay_process("--address-verifier", f"net:127.0.0.1:{free_port()}")
    assert rcpt_replies(relay.port, ["alice@local.test"]) == [(450, "4.3.0 cannot verify")]


def test_a_connection_the_network_verifier_closed_is_replaced(relay_process, line_verifier):
    line_verifier.one_shot = True  # the server hangs up after each answer
    relay = relay_process("--address-verifier", f"net:127.0.0.1:{line_verifier.server_address[1]}")
    assert rcpt_replies(relay.port, ["alice@local.test", "bad@local.test", "alice@local.test"]) == [
        (250, "2.1.5 Recipient OK"), (550, "5.1.1 no such user"), (250, "2.1.5 Recipient OK")]
    assert line_verifier.connections == 3


# ---------------------------------------------------------------- account:
@pytest.fixture(scope="module")
def account() -> Iterator[str]:
    """A real system account with a uid in E-MailRelay's default range (1000-32767)."""
    useradd, userdel = require("useradd"), require("userdel")
    name = f"mrv{os.getpid() % 100000}"
    subprocess.run([userdel, name], capture_output=True)
    result = subprocess.run([useradd, "--no-create-home", "--shell", "/usr/sbin/nologin", "-K", "UID_MIN=20000",
                             name], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert 1000 <= pwd.getpwnam(name).pw_uid <= 32767
    yield name
    subprocess.run([userdel, name], capture_output=True)


@pytest.mark.parametrize("spec, recipient, reply, spooled", [
    ("account:", "{user}@relay.test", 250, ("{user}", "{user}")),
    ("account:", "{USER}@Relay.Test", 250, ("{user}", "{user}")),      # case-blind domain, lower-case retry
    ("account:", "{user}@other.test", 550, None),                      # not the relay's domain
    ("account:", "nosuchuser@relay.test", 550, None),
    ("account:", "root@relay.test", 550, None),                         # uid 0 is not a mailbox
    ("account:", "nobody@relay.test", 550, None),                       # uid 65534 neither
    ("account:", "postmaster", 250, ("postmaster", "postmaster")),
    ("account:0-0", "root@relay.test", 250, ("root", "root")),
    ("account:check", "nosuchuser@relay.test", 250, ("nosuchuser@relay.test", None)),
    ("account:remote", "{user}@relay.test", 250, ("{user}@relay.test", None)),
    ("account:remote", "nosuchuser@relay.test", 550, None),
])
def test_system_accounts_are_mailboxes(relay_process, account, spec, recipient, reply, spooled):
    fill = {"user": account, "USER": account.upper()}
    relay = relay_process("--address-verifier", spec)
    [(code, text)] = rcpt_replies(relay.port, [recipient.format(**fill)])
    assert code == reply, text
    if code == 550:
        assert text == "5.1.1 rejected"
        return
    send(relay.port, [recipient.format(**fill)])
    envelope, _ = only_envelope(relay.spool)
    [r] = envelope.recipients
    assert (r.address, r.mailbox) == (spooled[0].format(**fill), spooled[1] and spooled[1].format(**fill))


def test_account_with_deliver_fills_the_users_maildir(relay_process, account):
    relay = relay_process("--address-verifier", "account:", "--filter", "deliver:")
    send(relay.port, [f"{account}@relay.test"])
    [delivered] = (relay.spool / account / "new").iterdir()
    assert delivered.read_bytes().endswith(BODY)


# ---------------------------------------------------------------- VRFY
def test_vrfy_is_not_answered_by_the_verifier_unless_enabled(relay_process, verifier):
    relay = relay_process("--address-verifier", verifier)
    with Wire(relay.port) as wire:
        wire.greet()
        assert wire.cmd("VRFY alice@local.test") == (252, "2.5.2 Cannot verify the user, but will accept the message")
        assert wire.cmd("VRFY bad@local.test")[0] == 252


def test_vrfy_through_the_verifier_when_enabled(relay_process, verifier, tmp_path):
    conf = tmp_path / "relay.conf"
    conf.write_text("[verifier]\nvrfy = true\n")
    relay = relay_process("-c", str(conf), "--address-verifier", verifier)
    with Wire(relay.port) as wire:
        wire.greet()
        assert wire.cmd("VRFY alice@local.test") == (250, "2.1.5 Alice Example")
        assert wire.cmd("VRFY <someone@far.test>") == (252, "2.1.5 cannot verify but will accept: someone@far.test")
        assert wire.cmd("VRFY bad@local.test") == (550, "5.1.1 no such user here")
        assert wire.cmd("VRFY busy@local.test") == (450, "4.2.0 mailbox busy, try later")
    args = (tmp_path / "args" / "alice@local.test").read_text().split("\n")
    assert args[1] == ""  # no sender for VRFY, as in E-MailRelay


# ---------------------------------------------------------------- the output contract itself
@pytest.mark.parametrize("code, output, outcome", [
    (0, b"Full Name\nmbox\n", Outcome("local", "mbox", full_name="Full Name")),
    (0, b"Full Name\r\nmbox\r\n", Outcome("local", "mbox", full_name="Full Name")),
    (0, b"\nmbox\n\n\n", Outcome("local", "mbox")),
    (1, b"\nNew@Addr.test\n", Outcome("remote", "New@Addr.test")),
    (1, b"only one line\n", Outcome.failure(CANNOT_VERIFY, "verifier broke its contract: exit code 1 "
                                                              "without two lines of output")),
    (2, b"", Outcome("invalid", text="mailbox unavailable", reason="exit code 2")),
    (3, b"later\nwhy\n", Outcome("temporary", text="later", reason="why")),
    (7, b"x\x1b[31my\n", Outcome.failure(CANNOT_VERIFY, "verifier broke its contract: exit code 7")),
    (100, b"ignored\n", Outcome("abort", reason="exit code 100")),
])
def test_program_output_is_read_like_emailrelay(code, output, outcome):
    assert outcome_from_program(code, output) == outcome


@pytest.mark.parametrize("line, outcome", [
    ("0|mbox|Full Name\r\n", Outcome("local", "mbox", full_name="Full Name")),
    ("0|mbox\n", Outcome.failure(CANNOT_VERIFY, "unrecognised answer '0|mbox\\n'")),
    ("1|\n", Outcome("remote", "")),
    ("2|no|why\n", Outcome("invalid", text="no", reason="why")),
    ("3|later\n", Outcome("temporary", text="later")),
    ("100\n", Outcome("abort", reason="network verifier said 100")),
])
def test_network_answers_are_read_like_emailrelay(line, outcome):
    assert outcome_from_line(line) == outcome
