"""`relay submit`: a message on stdin straight into the spool, like E-MailRelay's emailrelay-submit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailrelay.spool import Envelope
from mailrelay.submission import strip_fields

MESSAGE = (b"From: The App <app@example.com>\nTo: alice@example.org, Bob <bob@example.org>\n"
           b"Cc: carol@example.org\nBcc: secret@example.org\nSubject: Your order\n\nThanks for the order.\n")


def relay_submit(*args: str, stdin: bytes = MESSAGE, env: dict[str, str] | None = None,
                 home: Path | None = None) -> subprocess.CompletedProcess:
    base = {"PATH": os.environ["PATH"], "HOME": str(home or Path("/nonexistent"))}
    return subprocess.run([sys.executable, "-m", "mailrelay", "submit", *args], input=stdin,
                          capture_output=True, timeout=60, env={**base, **(env or {})})


def spooled(spool: Path, message_id: str) -> tuple[Envelope, bytes]:
    envelope = Envelope.from_bytes((spool / f"{message_id}.envelope").read_bytes())
    return envelope, (spool / f"{message_id}.content").read_bytes()


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    path = tmp_path / "spool"
    path.mkdir()
    return path


def test_submit_writes_the_message_and_prints_its_id(spool):
    result = relay_submit("--spool-dir", str(spool), "--from", "app@example.com", "alice@example.org",
                          "dave@example.net")
    assert result.returncode == 0, result.stderr
    message_id = result.stdout.decode().strip()
    assert message_id.startswith("emailrelay.")
    envelope, content = spooled(spool, message_id)
    assert envelope.sender == "app@example.com"
    assert [r.address for r in envelope.recipients] == ["alice@example.org", "dave@example.net"]
    assert envelope.client == "127.0.0.1" and envelope.content == "7bit"
    # Ready for the queue runner (no .new left), CRLF, a trace header, and never the Bcc line.
    assert sorted(p.name for p in spool.iterdir()) == [f"{message_id}.content", f"{message_id}.envelope"]
    assert content.startswith(b"Received: by ") and f"\tid {message_id} ;".encode() in content
    assert b"Bcc" not in content and b"secret@" not in content
    assert content.endswith(b"Subject: Your order\r\n\r\nThanks for the order.\r\n")


def test_without_recipients_they_come_from_the_headers(spool):
    result = relay_submit("-s", str(spool))
    assert result.returncode == 0, result.stderr
    envelope, content = spooled(spool, result.stdout.decode().strip())
    assert envelope.sender == "app@example.com"   # from the From: header
    assert [r.address for r in envelope.recipients] == ["alice@example.org", "bob@example.org",
                                                       "carol@example.org", "secret@example.org"]
    assert b"secret@" not in content


def test_the_spool_is_found_the_way_the_daemon_finds_it(tmp_path, spool):
    conf = tmp_path / "relay.conf"
    conf.write_text(f'[spool]\ndir = "{spool}"\n\n[server]\ndomain = "relay.example"\n')
    by_env = relay_submit("root", "--from", "", env={"MAILRELAY_CONFIG": str(conf)})
    assert by_env.returncode == 0, by_env.stderr
    envelope, content = spooled(spool, by_env.stdout.decode().strip())
    assert envelope.sender == "" and [r.address for r in envelope.recipients] == ["root@relay.example"]
    assert content.startswith(b"Received: by relay.example (mailrelay submit, from userid ")
    by_option = relay_submit("--config", str(conf), "-n", "x@example.org")
    assert by_option.stdout.decode().strip().endswith(".content")
    # The per-user default, as the daemon's: $XDG_DATA_HOME/mailrelay/spool.
    default = tmp_path / "xdg" / "mailrelay" / "spool"
    default.mkdir(parents=True)
    by_default = relay_submit("-v", "x@example.org", env={"XDG_DATA_HOME": str(tmp_path / "xdg")})
    assert by_default.returncode == 0, by_default.stderr
    assert Path(by_default.stdout.decode().strip()).parent == default


@pytest.mark.parametrize("args, stdin, config, error", [
    ((), b"Subject: nobody\n\nhi\n", "", "no recipients"),
    (("not an address",), MESSAGE, "", "recipient <not an address@"),
    (("--from", "bad sender@", "a@example.org"), MESSAGE, "", "sender <bad sender@>"),
    (("a@example.org",), b"Subject: big\n\n" + b"x" * 3000 + b"\n", "[smtp]\nsize = 2000\n",
     "exceeds the size limit of 2000 octets"),
    (("a@example.org",), b"not a message at all\n", "", "not an RFC 5322 message"),
])
def test_what_smtp_would_refuse_is_refused(tmp_path, spool, args, stdin, config, error):
    conf = tmp_path / "relay.conf"
    conf.write_text(f'[spool]\ndir = "{spool}"\n{config}')
    result = relay_submit("-c", str(conf), *args, stdin=stdin)
    assert result.returncode == 1
    assert error in result.stderr.decode()
    assert list(spool.iterdir()) == []


def test_a_missing_spool_directory_is_an_error_not_a_new_directory(tmp_path):
    result = relay_submit("--spool-dir", str(tmp_path / "typo"), "a@example.org")
    assert result.returncode == 1 and "does not exist" in result.stderr.decode()
    assert not (tmp_path / "typo").exists()


def test_content_options_as_in_emailrelay_submit(spool):
    result = relay_submit("-s", str(spool), "-F", "-d", "-I", "-f", "robot@example.com", "a@example.org",
                          stdin=b"From: someone@else.example\nSubject: x\n\nbody\n")
    _, content = spooled(spool, result.stdout.decode().strip())
    assert b"From: robot@example.com\r\n" in content and b"someone@else" not in content
    assert b"\r\nDate: " in content and b"\r\nMessage-ID: <" in content


def test_a_running_relay_forwards_what_submit_wrote(relay_process, sink, spool):
    next_hop = sink()
    relay = relay_process("--forward-to", f"127.0.0.1:{next_hop.port}", "--poll", "1", spool=spool)
    result = relay_submit("-s", str(spool), "-f", "app@example.com", "alice@example.org")
    assert result.returncode == 0, result.stderr
    [forwarded] = next_hop.wait_for(1, timeout=15)
    assert (forwarded.sender, forwarded.recipients) == ("app@example.com", ["alice@example.org"])
    assert b"Bcc" not in forwarded.content and b"Subject: Your order" in forwarded.content
    assert relay.proc.poll() is None


# ---------------------------------------------------------------- the header helpers, property-tested
_NAMES = st.sampled_from(["To", "Bcc", "BCC", "Subject", "X-Bcc-Note", "Received"])
_VALUES = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20)


@given(fields=st.lists(st.tuples(_NAMES, _VALUES, st.booleans()), max_size=8), body=st.binary(max_size=80))
def test_strip_fields_removes_exactly_the_named_fields_and_keeps_the_body(fields, body):
    head = b"".join(f"{n}: {v}\r\n".encode() + (b"\tmore\r\n" if folded else b"") for n, v, folded in fields)
    out = strip_fields(head + b"\r\n" + body, {"bcc"})
    kept = [(n, v, folded) for n, v, folded in fields if n.lower() != "bcc"]
    expected = b"".join(f"{n}: {v}\r\n".encode() + (b"\tmore\r\n" if folded else b"") for n, v, folded in kept)
    assert out == expected + b"\r\n" + body
