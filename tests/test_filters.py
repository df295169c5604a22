"""The filter chain with program, pipe: and exit: filters: E-MailRelay's contract, end to end.

Every test runs a real relay and talks SMTP to it; filters are real shell scripts.
"""

from __future__ import annotations

import smtplib
import stat
import time
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from conftest import wait_until
from mailrelay.filtering import parse_reason, result_from_exit, split_spec
from mailrelay.spool import Spool
from mailrelay_sdk import FilterAction, hookimpl
from test_forward_modes import relay_cli

MSG = "From: a@example.test\r\nTo: x@far.test\r\nSubject: {subject}\r\nMessage-ID: <{mid}@example.test>\r\n\r\nbody\r\n"


def script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def send(port: int, subject: str = "hello", mid: str = "m1", rcpts=("x@far.test",), sender="a@example.test"):
    """Send one message; return (code, text) of the final reply."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        try:
            client.sendmail(sender, list(rcpts), MSG.format(subject=subject, mid=mid).encode())
        except smtplib.SMTPDataError as e:
            return e.smtp_code, e.smtp_error.decode()
        except smtplib.SMTPRecipientsRefused as e:  # pragma: no cover - not expected here
            return next(iter(e.recipients.values()))
        return 250, ""


def spooled(spool_dir: Path) -> list[bytes]:
    spool = Spool(spool_dir)
    return [spool.read_content(i) for i in spool.ids()] if spool_dir.exists() else []


# ---------------------------------------------------------------- the exit-code contract
# The script takes its exit code from the Subject and its response lines from X-Say headers.
CHOOSER = r"""
code=$(sed -n 's/^Subject: exit \([0-9]*\).*/\1/p' "$1" | head -n 1)
sed -n 's/^X-Say: \(.*\)\r$/\1/p' "$1"
sed -n 's/^Subject: exit [0-9]* say \(.*\)\r$/<<\1>>/p' "$1"
exit ${code:-0}
"""


def test_server_stage_exit_codes_decide_like_emailrelay(tmp_path, relay_process):
    filt = script(tmp_path / "chooser.sh", CHOOSER)
    relay = relay_process("--filter", str(filt))
    cases = [  # subject, expected code, expected text fragment, spooled?
        ("exit 0", 250, "", True),
        ("exit 101", 250, "", True),
        ("exit 103", 250, "", True),                      # ok + rescan
        ("exit 1 say no thanks", 550, "5.7.1 no thanks", False),
        ("exit 42 say 452 try again later", 452, "4.7.1 try again later", False),
        ("exit 99 say 554 policy says no", 554, "5.7.1 policy says no", False),
        ("exit 7", 550, "rejected", False),               # no <<text>>: E-MailRelay's default text
        ("exit 100", 250, "", False),                     # abandon: acknowledged, not kept
        ("exit 102", 250, "", False),                     # abandon + rescan
        ("exit 104 say 553 not here", 553, "not here", False),  # fail + rescan
        ("exit 105", 451, "", False),                     # not defined at the server stage: temporary
        ("exit 200", 451, "", False),
    ]
    for n, (subject, code, text, kept) in enumerate(cases):
        before = len(spooled(relay.spool))
        got_code, got_text = send(relay.port, subject, mid=f"c{n}")
        assert (got_code, subject) == (code, subject), got_text
        assert text in got_text, (subject, got_text)
        assert len(spooled(relay.spool)) == before + (1 if kept else 0), subject
    assert not list(relay.spool.glob("*.new")), "no half-written message is left behind"


def test_the_second_response_line_is_logged_not_shown(tmp_path, relay_process):
    filt = script(tmp_path / "f.sh", 'echo "<<550 go away>>"; echo "[[matched rule 17]]"; exit 1\n')
    relay = relay_process("--filter", str(filt))
    code, text = send(relay.port)
    assert code == 550 and "go away" in text and "rule 17" not in text
    wait_until(lambda: "matched rule 17" in relay.log, what="the reason in the log")


def test_a_response_cannot_inject_control_characters(tmp_path, relay_process):
    filt = script(tmp_path / "f.sh", r"printf '<<550 bad\001\033[31m word>>\n'; exit 1" + "\n")
    relay = relay_process("--filter", str(filt))
    code, text = send(relay.port)
    assert code == 550
    assert "\x01" not in text and "\x1b" not in text and "bad" in text and "word" in text


def test_program_gets_paths_a_reduced_environment_and_may_edit_both_files(tmp_path, relay_process):
    record = tmp_path / "record"
    filt = script(tmp_path / "f.sh", f"""
echo "args=$#|$1|$2" > {record}
env >> {record}
printf 'X-Stamped: yes\\r\\n' > "$1.tmp" && cat "$1" >> "$1.tmp" && mv "$1.tmp" "$1"
sed -i 's/^X-MailRelay-To-Remote: x@far.test/X-MailRelay-To-Remote: y@far.test/' "$2"
exit 0
""")
    relay = relay_process("--filter", str(filt), env={"SECRET_TOKEN": "do-not-leak", "HOME": "/root"})
    assert send(relay.port)[0] == 250
    lines = record.read_text().splitlines()
    argc, content_path, envelope_path = lines[0].removeprefix("args=").split("|")
    assert argc == "2"
    assert content_path.endswith(".content") and envelope_path.endswith(".envelope.new")
    env = dict(line.split("=", 1) for line in lines[1:] if "=" in line)
    assert env["PATH"] == "/usr/bin:/bin"
    assert "SECRET_TOKEN" not in env and "HOME" not in env
    (content,) = spooled(relay.spool)
    assert content.startswith(b"X-Stamped: yes\r\n")
    spool = Spool(relay.spool)
    (envelope,) = [spool.read_envelope(i) for i in spool.ids()]
    assert [r.address for r in envelope.recipients] == ["y@far.test"]


def test_an_emailrelay_style_shell_filter_works_unmodified(tmp_path, relay_process):
    # The example from E-MailRelay's reference: drop mail from one client address.
    filt = script(tmp_path / "filter.sh", """
content="$1"
envelope="$2"
ip="`sed -n -e 's/^X-MailRelay-Client: \\(.*\\)\\r$/\\1/p' \\"$envelope\\"`"
if test "$ip" = "127.0.0.1"
then
    rm -f "$envelope" "$content"
    exit 100
fi
exit 0
""")
    relay = relay_process("--filter", str(filt))
    assert send(relay.port)[0] == 250
    assert list(relay.spool.iterdir()) == []


def test_a_hanging_filter_is_killed_and_the_client_told_to_retry(tmp_path, relay_process):
    pidfile = tmp_path / "pid"
    filt = script(tmp_path / "hang.sh", f"sleep 300 & echo $! > {pidfile}; wait\n")
    relay = relay_process("--filter", str(filt), "--filter-timeout", "1")
    started = time.monotonic()
    code, text = send(relay.port)
    assert code == 451 and time.monotonic() - started < 10
    child = int(pidfile.read_text())
    wait_until(lambda: not Path(f"/proc/{child}").exists() or
               Path(f"/proc/{child}/stat").read_text().split()[2] == "Z", what="the filter's child killed")
    assert spooled(relay.spool) == []
    assert send(relay.port, "exit 0", mid="m2")[0] == 451  # still serving (and still hanging)
    assert relay.proc.poll() is None


def test_a_crashing_or_vanished_program_is_a_temporary_failure(tmp_path, relay_process):
    filt = script(tmp_path / "crash.sh", "kill -SEGV $$\n")
    relay = relay_process("--filter", str(filt))
    assert send(relay.port)[0] == 451
    filt.unlink()
    assert send(relay.port, mid="m2")[0] == 451
    assert "cannot run" in relay.log
    assert relay.proc.poll() is None and spooled(relay.spool) == []


def test_a_missing_program_or_unknown_scheme_stops_start_up(tmp_path):
    result = relay_cli("--no-daemon", "--port", "0", "--spool-dir", str(tmp_path / "s"),
                       "--filter", str(tmp_path / "nope.sh"))
    assert result.returncode != 0 and "is not an executable file" in result.stderr
    result = relay_cli("--no-daemon", "--port", "0", "--spool-dir", str(tmp_path / "s"), "--filter", "bogus:x")
    assert result.returncode != 0
    assert "unknown scheme 'bogus'" in result.stderr and "exit:" in result.stderr


def test_the_chain_runs_in_order_and_stops_at_the_first_verdict(tmp_path, relay_process):
    trail = tmp_path / "trail"
    first = script(tmp_path / "first.sh", f"echo first >> {trail}\n")
    second = script(tmp_path / "second.sh", f"echo second >> {trail}\n")
    relay = relay_process("--filter", f"{first},exit:0,{second}", "--filter", "exit:1,exit:0")
    assert send(relay.port)[0] == 550
    assert trail.read_text().split() == ["first", "second"]


# ---------------------------------------------------------------- pipe:
def test_pipe_filter_edits_via_stdout_and_sees_the_envelope_in_its_environment(tmp_path, relay_process):
    filt = script(tmp_path / "p.sh", """
printf 'X-Env: from=%s rcpt=%s ip=%s helo=%s id=%s msgid=%s\\n' "$MAIL_FROM" "$RCPT_TO" "$CLIENT_IP" "$HELO" "$SPOOL_ID" "$MESSAGE_ID"
cat
""")
    relay = relay_process("--filter", f"pipe:{filt}")
    assert send(relay.port, rcpts=("x@far.test", "y@far.test"))[0] == 250
    (content,) = spooled(relay.spool)
    header = content.split(b"\r\n", 1)[0].decode()
    spool_id = Spool(relay.spool).ids()[0]
    assert header.startswith("X-Env: from=a@example.test rcpt=x@far.test,y@far.test ip=127.0.0.1 helo=")
    assert header.split("helo=")[1].split(" ")[0], "smtplib's EHLO name is passed on"
    assert f"id={spool_id} msgid=<m1@example.test>" in header
    assert b"\n" not in content.replace(b"\r\n", b"")  # LF from the script became CRLF in the spool


def test_pipe_filter_with_no_output_leaves_the_message_unchanged(tmp_path, relay_process):
    filt = script(tmp_path / "p.sh", "cat > /dev/null; exit 0\n")
    relay = relay_process("--filter", f"pipe:{filt}")
    assert send(relay.port)[0] == 250
    (content,) = spooled(relay.spool)
    assert content.endswith(MSG.format(subject="hello", mid="m1").encode())


def test_pipe_filter_rejects_with_its_response(tmp_path, relay_process):
    filt = script(tmp_path / "p.sh", "grep -q SPAMMY && { echo '<<554 looks spammy>>'; exit 3; }; exit 0\n")
    relay = relay_process("--filter", f"pipe:{filt}")
    assert send(relay.port, "SPAMMY offer") == (554, "5.7.1 looks spammy")
    assert send(relay.port, "fine", mid="m2")[0] == 250


# ---------------------------------------------------------------- client stage
def test_client_filter_edits_what_is_forwarded_and_may_reroute(tmp_path, inprocess_relay, sink):
    default, other = sink(), sink()
    filt = script(tmp_path / "c.sh", f"""
printf 'X-Client-Filtered: yes\\r\\n' > "$1.tmp" && cat "$1" >> "$1.tmp" && mv "$1.tmp" "$1"
grep -q 'reroute' "$1" && sed -i 's/^X-MailRelay-End: 1/X-MailRelay-ForwardTo: 127.0.0.1:{other.port}\\r\\nX-MailRelay-End: 1/' "$2"
case "$2" in *.envelope.busy) exit 0;; *) exit 9;; esac
""")
    relay = inprocess_relay(enable=["forward", "filters"], config={
        "forward": {"to": f"127.0.0.1:{default.port}"}, "filters": {"client": [str(filt)]}})
    assert send(relay.port, "plain")[0] == 250
    assert send(relay.port, "reroute me", mid="m2")[0] == 250
    wait_until(lambda: default.received and other.received, what="both messages forwarded")
    assert default.received[0].message["X-Client-Filtered"] == "yes"
    assert other.received[0].message["Subject"] == "reroute me"
    wait_until(lambda: not list(relay.spool.directory.glob("*.envelope*")), what="spool emptied")


def test_client_filter_rejection_bounces_and_abandon_keeps_nothing(tmp_path, inprocess_relay, sink):
    target = sink()
    filt = script(tmp_path / "c.sh", """
grep -q '^X-MailRelay-From: a@' "$2" || exit 0  # let the bounce through
grep -q 'Subject: refuse' "$1" && { echo '<<550 not leaving here>>'; exit 1; }
grep -q 'Subject: take' "$1" && { rm -f "$1" "$2"; exit 100; }
exit 0
""")
    relay = inprocess_relay(enable=["forward", "filters"], config={
        "forward": {"to": f"127.0.0.1:{target.port}"}, "filters": {"client": [str(filt)]}})
    assert send(relay.port, "refuse", sender="a@example.test")[0] == 250
    assert send(relay.port, "take", mid="m2")[0] == 250
    bounce = wait_until(lambda: [r for r in target.received if r.sender == ""], what="a bounce")[0]
    assert "not leaving here" in bounce.message.as_string()
    assert not [r for r in target.received if r.message["Subject"] in ("refuse", "take")]
    wait_until(lambda: len(relay.spool.ids("bad")) == 1, what="the refused message kept as .bad")
    assert relay.spool.ids("ready") == []


def test_client_filter_exit_102_stops_the_scan_after_the_current_message(tmp_path, sink):
    from test_forward_modes import fill
    target = sink()
    spool_dir = tmp_path / "spool"
    fill(spool_dir, 3)
    config = tmp_path / "relay.conf"
    config.write_text("[queue]\nconcurrency = 1\n")  # one at a time, as E-MailRelay forwards
    result = relay_cli("-c", str(config), "--as-client", f"127.0.0.1:{target.port}", "--spool-dir",
                       str(spool_dir), "--client-filter", "exit:102")
    assert len(target.received) == 1, result.stdout + result.stderr
    assert len(Spool(spool_dir).ids()) == 2


# ---------------------------------------------------------------- events and options
class Events:
    def __init__(self):
        self.seen = []

    @hookimpl
    def on_event(self, event):
        if event.name == "filter.done":
            self.seen.append(event)


def test_each_filter_run_emits_filter_done(tmp_path, inprocess_relay):
    events = Events()
    relay = inprocess_relay(plugins={"events": events}, enable=["filters"],
                            config={"filters": {"server": ["exit:0", "exit:1"]}})
    assert send(relay.port)[0] == 550
    wait_until(lambda: len(events.seen) == 2, what="two filter.done events")
    first, second = events.seen
    assert (first.data["filter"], first.data["verdict"], first.data["stage"]) == ("exit:0", "ok", "server")
    assert (second.data["filter"], second.data["verdict"], second.data["code"]) == ("exit:1", "reject", 550)
    assert all(e.data["duration_ms"] >= 0 for e in events.seen)


def test_filters_from_an_emailrelay_options_file(tmp_path, relay_process):
    filt = script(tmp_path / "f.sh", 'echo "<<550 from the options file>>"; exit 1\n')
    options = tmp_path / "emailrelay.conf"
    options.write_text(f"filter {filt}\nfilter-timeout 5\n")
    relay = relay_process(str(options))
    assert send(relay.port) == (550, "5.7.1 from the options file")


# ---------------------------------------------------------------- properties
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200))
def test_any_output_gives_a_single_line_response(output):
    reason = parse_reason(output)
    assert "\r" not in reason.response and "\n" not in reason.response
    assert reason.code == 0 or 400 <= reason.code <= 599
    assert reason.response


@given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e).filter(lambda c: c not in "<>[]"),
               min_size=1, max_size=80).filter(lambda t: t.strip() == t and not t[:1].isdigit()),
       st.sampled_from(["<<{}>>", "[[{}]]"]), st.text(alphabet="abc \n", max_size=20))
def test_a_bracketed_response_is_found_whatever_comes_before(text, form, noise):
    output = noise + "\n" + form.format(text) + "\ntrailing"
    assert parse_reason(output).response == text


@given(st.integers(min_value=-64, max_value=255), st.sampled_from(["server", "client"]))
def test_every_exit_code_maps_to_a_verdict(code, stage):
    result = result_from_exit(code, stage, "<<550 x>>")
    assert isinstance(result.action, FilterAction)
    if result.action in (FilterAction.REJECT, FilterAction.FAIL):
        assert result.code is not None and 400 <= result.code <= 599


@pytest.mark.parametrize("spec, expected", [
    ("/usr/local/bin/f", ("file", "/usr/local/bin/f")), ("./f.sh", ("file", "./f.sh")),
    ("file:/x", ("file", "/x")), ("spam:127.0.0.1:783", ("spam", "127.0.0.1:783")),
    ("exit:103", ("exit", "103")), ("copy:", ("copy", "")), ("f.sh", ("file", "f.sh")),
    ("mx:nst=60;rt=60;127.0.0.1:53", ("mx", "nst=60;rt=60;127.0.0.1:53")),
])
def test_specs_split_like_emailrelay(spec, expected):
    assert split_spec(spec) == expected


def test_an_edit_in_memory_reaches_the_file_before_a_filter_that_reads_files(tmp_path, relay_process):
    stamp = script(tmp_path / "stamp.sh", "printf 'X-Stamp: 1\\r\\n'; cat\n")
    check = script(tmp_path / "check.sh", "grep -q '^X-Stamp: 1' \"$1\" || { echo '<<550 not stamped>>'; exit 1; }\n")
    relay = relay_process("--filter", f"pipe:{stamp},msgid:,{check}")
    assert send(relay.port) == (250, "")
    (content,) = spooled(relay.spool)
    assert content.startswith(b"X-Stamp: 1\r\n")
