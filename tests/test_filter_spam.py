"""``spam:`` and ``spam-edit:``: SpamAssassin's spamd (a real one, see tests/spamd.py) as a filter."""

from __future__ import annotations

import email
import email.policy
import re

import pytest

from conftest import free_port, spooled_contents, submit, wait_until
from sinks import Sink
from spamd import GTUBE, spamd, spamd_factory  # noqa: F401 (fixtures)

HAM = (b"From: Alice <alice@example.test>\r\nTo: bob@far.test\r\nSubject: lunch on friday\r\n"
       b"Date: Wed, 25 Nov 2026 12:00:00 +0000\r\nMessage-ID: <lunch.42@example.test>\r\n\r\n"
       b"Shall we meet at noon at the usual place?\r\n")
SPAM = HAM.replace(b"Shall we meet at noon at the usual place?", GTUBE.encode())
TEMPFAIL = (451, "4.3.0 Temporary local problem, please try again later")


def send(relay, content: bytes) -> tuple[int, str]:
    return submit(relay.port, content, sender="alice@example.test", recipients=["bob@far.test"])


def spooled(relay) -> list[bytes]:
    return spooled_contents(relay.spool)


def parsed(content: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(content, policy=email.policy.default)  # type: ignore[return-value]


def config(tmp_path, text: str) -> str:
    path = tmp_path / "relay.conf"
    path.write_text(text)
    return str(path)


# ---------------------------------------------------------------- spam:
def test_spam_is_rejected_with_550_and_the_score(relay_process, spamd):
    relay = relay_process("--filter", f"spam:{spamd.address}")
    code, text = send(relay, SPAM)
    assert code == 550
    match = re.fullmatch(r"5\.7\.1 Message looks like spam \(score (-?[0-9.]+)/5\.0\)", text)
    assert match, text
    # GTUBE scores 1000; the other rules that fire move it a little either way (999.0 seen).
    assert float(match.group(1)) > 900
    assert spooled(relay) == []
    wait_until(lambda: re.search(r"reason='spamd score [0-9.]+/5.0 tests=[A-Z0-9_,]*GTUBE", relay.log),
               what="the rules in the log")
    assert "GTUBE" not in text


def test_normal_mail_passes_spam_unchanged(relay_process, spamd):
    relay = relay_process("--filter", f"spam:{spamd.address}")
    assert send(relay, HAM) == (250, "")
    [content] = spooled(relay)
    assert content.endswith(HAM) and b"X-Spam" not in content


def test_spam_through_spamds_unix_socket(relay_process, spamd):
    relay = relay_process("--filter", f"spam:{spamd.socket}")
    assert send(relay, SPAM)[0] == 550
    assert send(relay, HAM) == (250, "")
    assert len(spooled(relay)) == 1


def test_message_over_max_size_passes_unscanned(relay_process, spamd, tmp_path):
    conf = config(tmp_path, "[spam]\nmax_size = 2000\n")
    relay = relay_process("-c", conf, "--filter", f"spam:{spamd.address}")
    big = SPAM.replace(b"\r\n\r\n", b"\r\n\r\n" + b"padding line\r\n" * 200, 1)
    assert send(relay, big) == (250, "")
    assert send(relay, SPAM)[0] == 550  # small enough to be scanned
    [content] = spooled(relay)
    assert content.endswith(big) and b"X-Spam" not in content
    wait_until(lambda: "over [spam] max_size 2000" in relay.log, what="the skip in the log")


# ---------------------------------------------------------------- spam-edit:
def test_spam_edit_adds_spamassassins_headers_to_normal_mail(relay_process, spamd):
    relay = relay_process("--filter", f"spam-edit:{spamd.address}")
    assert send(relay, HAM) == (250, "")
    [content] = spooled(relay)
    message = parsed(content)
    assert message["X-Spam-Status"].startswith("No, score=")
    assert message["X-Spam-Checker-Version"].startswith("SpamAssassin")
    assert message.get_content().strip() == "Shall we meet at noon at the usual place?"
    assert b"\r\n" in content and b"\n" not in content.replace(b"\r\n", b"")  # still CRLF


def test_spam_edit_accepts_spam_and_wraps_it_in_a_report(relay_process, spamd):
    relay = relay_process("--filter", f"spam-edit:{spamd.address}")
    assert send(relay, SPAM) == (250, "")
    [content] = spooled(relay)
    message = parsed(content)
    assert message["X-Spam-Flag"] == "YES"
    assert message["X-Spam-Status"].startswith("Yes, score=")
    assert message.get_content_type() == "multipart/mixed"
    [original] = [part for part in message.iter_parts() if part.get_content_type() == "message/rfc822"]
    assert GTUBE in original.as_string()


def test_spam_edit_at_the_client_stage_edits_what_is_forwarded(relay_process, spamd):
    target = Sink(free_port()).start()
    try:
        relay = relay_process("--forward-to", f"127.0.0.1:{target.port}", "--poll", "0",
                              "--client-filter", f"spam-edit:{spamd.address}")
        assert send(relay, HAM) == (250, "")
        [got] = target.wait_for(1)
        assert got.message["X-Spam-Status"].startswith("No, score=")
        wait_until(lambda: spooled(relay) == [], what="an empty spool")
    finally:
        target.stop()


# ---------------------------------------------------------------- spamd unavailable
@pytest.mark.parametrize("scheme", ["spam", "spam-edit"])
def test_spamd_stopping_gives_a_temporary_failure_by_default(relay_process, spamd_factory, scheme):
    private = spamd_factory()
    relay = relay_process("--filter", f"{scheme}:{private.address}")
    assert send(relay, HAM) == (250, "")
    private.stop()
    assert send(relay, HAM.replace(b"lunch", b"dinner")) == TEMPFAIL
    assert len(spooled(relay)) == 1  # only the message spamd saw
    wait_until(lambda: "spamd unavailable" in relay.log, what="the failure in the log")


def test_spamd_stopping_with_on_error_accept_passes_tagged_mail(relay_process, spamd_factory, tmp_path):
    private = spamd_factory()
    conf = config(tmp_path, '[spam]\non_error = "accept"\n')
    relay = relay_process("-c", conf, "--filter", f"spam:{private.address}")
    assert send(relay, SPAM)[0] == 550  # spamd up: spam is still refused
    private.stop()
    assert send(relay, SPAM) == (250, "")
    [content] = spooled(relay)
    assert parsed(content)["X-Spam-Checker"] == "unavailable"
    assert content.endswith(SPAM)
    wait_until(lambda: "passing the message unscanned" in relay.log, what="the warning in the log")


def test_spamd_never_running_is_a_temporary_failure(relay_process):
    relay = relay_process("--filter", f"spam:127.0.0.1:{free_port()}")
    assert send(relay, HAM) == TEMPFAIL
    assert spooled(relay) == []


def test_bad_on_error_setting_stops_start_up(relay_process, tmp_path):
    conf = config(tmp_path, '[spam]\non_error = "ignore"\n')
    relay = relay_process("-c", conf, "--filter", "spam:127.0.0.1:783", wait=False)
    assert relay.proc.wait(20) != 0
    assert "on_error" in relay.log and "'ignore'" in relay.log
