"""mailrelay_sdk.script: a `pipe:` filter written in Python, run by a real relay."""

from __future__ import annotations

import io
import smtplib
import sys

import pytest

from mailrelay_sdk import script

from conftest import spooled_contents, submit

FILTER = '''#!{python}
from mailrelay_sdk import script


def check(mail):
    subject = mail.headers.get("Subject", "")
    if "lottery" in subject.lower():
        return script.reject("Looks like spam", code=554, reason="lottery in the subject")
    if mail.envelope.sender.endswith("@later.test"):
        return script.tempfail("Greylisted by the script, try again later")
    if subject == "crash":
        raise RuntimeError("a bug in the filter")
    if subject == "take it":
        return script.abandon()
    mail.remove_header("X-Internal")
    env = mail.envelope
    mail.add_header("X-Envelope", f"from={{env.sender}} to={{','.join(env.recipients)}} "
                                  f"client={{env.client_ip}} helo={{env.helo}} spool={{env.spool_id}}")
    return None


if __name__ == "__main__":
    script.main(check)
'''


@pytest.fixture
def scripted_relay(relay_process, tmp_path):
    path = tmp_path / "check.py"
    path.write_text(FILTER.format(python=sys.executable))
    path.chmod(0o755)
    return relay_process("--filter", f"pipe:{path}")


def _message(subject: str, extra: str = "") -> bytes:
    return f"From: a@example.test\r\nSubject: {subject}\r\n{extra}\r\nbody line\r\n".encode()


def test_the_script_sees_the_envelope_and_edits_the_message(scripted_relay):
    code, _ = submit(scripted_relay.port, _message("hello", "X-Internal: secret\r\n\tcontinued\r\n"),
                     sender="a@example.test", recipients=["b@example.test", "c@example.test"])
    assert code == 250
    [content] = spooled_contents(scripted_relay.spool)
    head, _, body = content.partition(b"\r\n\r\n")
    assert head.startswith(b"X-Envelope: from=a@example.test to=b@example.test,c@example.test "
                           b"client=127.0.0.1 helo=")
    assert b" spool=emailrelay." in head and b"X-Internal" not in content and b"continued" not in content
    assert b"Subject: hello" in head and body == b"body line\r\n"


@pytest.mark.parametrize("subject, sender, code, reply", [
    ("You won the lottery", "a@example.test", 554, "5.7.1 Looks like spam"),
    ("hello", "a@later.test", 451, "4.7.1 Greylisted by the script, try again later"),
    ("crash", "a@example.test", 451, "4.7.1 Temporary local problem, please try again later"),
])
def test_the_scripts_decision_is_the_smtp_reply(scripted_relay, subject, sender, code, reply):
    assert submit(scripted_relay.port, _message(subject), sender=sender) == (code, reply)
    assert spooled_contents(scripted_relay.spool) == []


def test_a_crashing_script_is_logged_with_its_traceback(scripted_relay):
    submit(scripted_relay.port, _message("crash"))
    scripted_relay.stop()
    assert "RuntimeError: a bug in the filter" in scripted_relay.log


def test_an_abandoning_script_takes_the_message(scripted_relay):
    with smtplib.SMTP("127.0.0.1", scripted_relay.port) as client:
        assert client.sendmail("a@example.test", ["b@example.test"], _message("take it")) == {}
    assert spooled_contents(scripted_relay.spool) == []


# ---------------------------------------------------------------- the helper on its own
def _run(handler, content=b"Subject: x\r\n\r\nbody\r\n", env=None):
    out, err = io.BytesIO(), io.StringIO()
    code = script.run(handler, stdin=io.BytesIO(content), stdout=out, stderr=err,
                      environ=env or {"MAIL_FROM": "a@x.test", "RCPT_TO": "b@y.test,c@y.test"})
    return code, out.getvalue(), err.getvalue()


def test_run_answers_with_exit_codes_and_response_lines():
    assert _run(lambda mail: None) == (0, b"", "")
    assert _run(lambda mail: script.abandon())[:2] == (100, b"")
    code, out, _ = _run(lambda mail: script.reject("No\r\nthanks >> really", code=550, reason="why"))
    assert (code, out) == (1, b"<<550 No thanks > > really>>\n<<why>>\n")
    code, out, err = _run(lambda mail: 42)
    assert code == 1 and out.startswith(b"<<451 ") and "not a Decision" in err


def test_run_passes_the_edited_message_on():
    def edit(mail):
        assert mail.envelope.recipients == ("b@y.test", "c@y.test") and mail.body == b"body\r\n"
        mail.add_header("X-Seen", "yes")
    assert _run(edit)[1] == b"X-Seen: yes\r\nSubject: x\r\n\r\nbody\r\n"


def test_decisions_check_their_codes():
    with pytest.raises(ValueError):
        script.reject("x", code=451)
    with pytest.raises(ValueError):
        script.tempfail("x", code=550)
    with pytest.raises(ValueError):
        script.Mail(b"").add_header("Bad Name", "x")
    with pytest.raises(ValueError):
        script.Mail(b"").add_header("X-Ok", "two\r\nlines")
