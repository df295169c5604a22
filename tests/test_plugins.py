"""The plugin host: order, verdicts at every SMTP phase, failures, filters, observers, discovery."""

from __future__ import annotations

import asyncio
import json
import smtplib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mailrelay.plugin_host import PluginError, PluginHost
from mailrelay_sdk import FilterResult, Verdict, hookimpl
from smtpwire import Wire

MSG = b"From: a@example.test\r\nSubject: hi\r\n\r\nbody\r\n"
HERE = Path(__file__).parent


class Recorder:
    """A plugin that records calls and answers with a scripted verdict per hook."""

    def __init__(self, name: str, log: list, **answers):
        self.name, self.log, self.answers = name, log, answers

    def _answer(self, hook):
        self.log.append((self.name, hook))
        answer = self.answers.get(hook)
        if isinstance(answer, Exception):
            raise answer
        return answer

    @hookimpl
    def on_connect(self, session):
        return self._answer("on_connect")

    @hookimpl
    def on_helo(self, session, hostname):
        return self._answer("on_helo")

    @hookimpl
    def on_mail_from(self, address):
        return self._answer("on_mail_from")

    @hookimpl
    def on_rcpt_to(self, recipient):
        return self._answer("on_rcpt_to")

    @hookimpl
    def on_receive(self, message):
        return self._answer("on_receive")


def send(port: int, rcpts=("b@example.test",)) -> dict:
    with smtplib.SMTP("127.0.0.1", port) as client:
        return client.sendmail("a@example.test", list(rcpts), MSG)


@pytest.mark.parametrize("hook,code", [("on_helo", 550), ("on_mail_from", 550), ("on_rcpt_to", 550),
                                       ("on_receive", 550)])
def test_a_plugin_can_reject_at_every_phase(inprocess_relay, hook, code):
    log: list = []
    relay = inprocess_relay(plugins={"p": Recorder("p", log, **{hook: Verdict.deny("No thanks")})})
    with pytest.raises(smtplib.SMTPException) as e:
        send(relay.port)
    text = str(e.value)
    assert str(code) in text and "No thanks" in text
    assert relay.spool.ids() == []


def test_a_plugin_can_refuse_the_connection(inprocess_relay):
    relay = inprocess_relay(plugins={"p": Recorder("p", [], on_connect=Verdict.deny(
        "Listed in a blocklist", code=554, enhanced="5.7.1"))})
    with Wire(relay.port) as w:
        assert w.reply() == (554, "5.7.1 Listed in a blocklist")
        assert w.closed()


def test_order_and_first_decisive_verdict(inprocess_relay):
    log: list = []
    relay = inprocess_relay(plugins={
        "first": Recorder("first", log),                                    # no opinion
        "second": Recorder("second", log, on_rcpt_to=Verdict.ok()),         # decides: accept
        "third": Recorder("third", log, on_rcpt_to=Verdict.deny("never")),  # never asked
    })
    assert send(relay.port) == {}
    assert [n for n, h in log if h == "on_rcpt_to"] == ["first", "second"]
    log.clear()
    relay2 = inprocess_relay(plugins={
        "third": Recorder("third", log, on_rcpt_to=Verdict.deny("third refuses", code=550, enhanced="5.1.1")),
        "second": Recorder("second", log, on_rcpt_to=Verdict.ok()),
    })
    with pytest.raises(smtplib.SMTPRecipientsRefused) as e:
        send(relay2.port)
    assert e.value.recipients["b@example.test"] == (550, b"5.1.1 third refuses")
    assert [n for n, h in log if h == "on_rcpt_to"] == ["third"]


def test_a_raising_plugin_is_a_temporary_failure_not_a_crash(inprocess_relay, caplog):
    relay = inprocess_relay(plugins={"broken": Recorder("broken", [], on_mail_from=RuntimeError("bug!"))})
    with pytest.raises(smtplib.SMTPSenderRefused) as e:
        send(relay.port)
    assert e.value.smtp_code == 451 and e.value.smtp_error.startswith(b"4.3.0")
    assert "plugin 'broken' failed in on_mail_from" in caplog.text
    # the daemon is still serving
    with Wire(relay.port) as w:
        assert w.greet()[0] == 250


def test_a_plugin_returning_the_wrong_type_is_a_temporary_failure(inprocess_relay):
    relay = inprocess_relay(plugins={"odd": Recorder("odd", [], on_rcpt_to="yes please")})
    with pytest.raises(smtplib.SMTPRecipientsRefused) as e:
        send(relay.port)
    assert e.value.recipients["b@example.test"][0] == 451


class Slow:
    @hookimpl
    async def on_mail_from(self, address):
        await asyncio.sleep(30)


def test_a_hanging_async_plugin_times_out_with_451(inprocess_relay):
    relay = inprocess_relay(plugins={"slow": Slow()}, config={"plugins": {"hook_timeout": 0.5}})
    started = time.monotonic()
    with pytest.raises(smtplib.SMTPSenderRefused) as e:
        send(relay.port)
    assert e.value.smtp_code == 451
    assert time.monotonic() - started < 10


class AsyncRewriter:
    """Marks one recipient local, as an address verifier would."""

    @hookimpl
    async def on_rcpt_to(self, recipient):
        await asyncio.sleep(0)
        if recipient.address == "alice@local.test":
            from mailrelay_sdk import Recipient
            return Verdict.ok(recipient=Recipient.local(recipient.address, "alice"))
        return None


def test_on_rcpt_to_can_mark_a_recipient_local(inprocess_relay):
    relay = inprocess_relay(plugins={"verifier": AsyncRewriter()})
    send(relay.port, ["alice@local.test", "bob@far.test"])
    [message_id] = relay.spool.ids()
    raw = relay.spool.envelope_path(message_id).read_bytes()
    assert b"X-MailRelay-To-Local: alice\r\n" in raw
    assert b"X-MailRelay-To-Remote: bob@far.test\r\n" in raw


def test_discard_and_quarantine(inprocess_relay):
    relay = inprocess_relay(plugins={"p": Recorder("p", [], on_receive=Verdict.discard("spam trap"))})
    assert send(relay.port) == {}
    assert relay.spool.ids() == [] and relay.spool.ids("bad") == []
    relay = inprocess_relay(plugins={"p": Recorder("p", [], on_receive=Verdict.quarantine("looks phishy"))})
    assert send(relay.port) == {}
    assert relay.spool.ids() == []
    [held] = relay.spool.ids("bad")
    assert relay.spool.read_envelope(held, "bad").reason == "quarantined: looks phishy"


class Filter:
    def __init__(self, result=None, exc=None):
        self.result, self.exc, self.seen = result, exc, []

    @hookimpl
    def on_filter(self, message, stage):
        self.seen.append((stage, message.id, message.content_path.exists(),
                          message.content_path.with_name(message.id + ".envelope.new").exists()))
        if self.exc:
            raise self.exc
        return self.result


def test_server_filter_sees_the_written_message_and_can_edit_it(inprocess_relay):
    edit = Filter()

    def stamp(message, stage):
        return FilterResult.ok(content=message.content.replace(b"Subject: hi", b"X-Filtered: yes\r\nSubject: hi"))
    edit.on_filter = hookimpl(stamp)
    observer = Filter()
    relay = inprocess_relay(plugins={"stamp": edit, "observer": observer})
    send(relay.port)
    [message_id] = relay.spool.ids()
    assert b"X-Filtered: yes\r\nSubject: hi" in relay.spool.read_content(message_id)
    # the filter ran at the server stage, before the envelope was published
    assert observer.seen == [("server", message_id, True, True)]


@pytest.mark.parametrize("result,code,stored", [
    (FilterResult.reject("Virus found", 554), 554, False),
    (FilterResult.fail("Scanner unavailable"), 451, False),
    (FilterResult.abandon(), 250, False),
])
def test_filter_verdicts(inprocess_relay, result, code, stored):
    relay = inprocess_relay(plugins={"f": Filter(result)})
    with Wire(relay.port) as w:
        w.greet()
        w.cmd("MAIL FROM:<a@example.test>")
        w.cmd("RCPT TO:<b@example.test>")
        w.cmd("DATA")
        assert w.cmd(MSG + b".")[0] == code
    assert bool(relay.spool.ids()) == stored
    assert list(relay.spool.directory.iterdir()) == []  # nothing half-kept


def test_a_crashing_filter_loses_nothing_acknowledged(inprocess_relay):
    relay = inprocess_relay(plugins={"f": Filter(exc=ValueError("segfault-ish"))})
    with pytest.raises(smtplib.SMTPDataError) as e:
        send(relay.port)
    assert e.value.smtp_code == 451
    assert list(relay.spool.directory.iterdir()) == []


class Observer:
    def __init__(self):
        self.events = []

    @hookimpl
    async def on_event(self, event):
        self.events.append(event)


def test_observers_hear_about_received_messages(inprocess_relay):
    observer = Observer()
    relay = inprocess_relay(plugins={"obs": observer})
    send(relay.port)
    [message_id] = relay.spool.ids()
    deadline = time.monotonic() + 5
    while not any(e.name == "received" for e in observer.events) and time.monotonic() < deadline:
        time.sleep(0.02)
    received = [e for e in observer.events if e.name == "received"]
    assert received and received[0].message_id == message_id
    assert received[0].data["recipients"] == ["b@example.test"]


def test_unknown_plugin_is_a_clear_error_listing_known_ones():
    host = PluginHost()
    with pytest.raises(PluginError) as e:
        host.enable(["eventlog", "no-such-plugin"])
    assert "no-such-plugin" in str(e.value) and "eventlog" in str(e.value)


# ---------------------------------------------------------------- a third-party package from PyPI
@pytest.fixture(scope="module")
def thirdparty_installed():
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    result = subprocess.run([*pip, "install", "--no-build-isolation", "--no-deps",
                             str(HERE / "thirdparty_plugin")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"pip could not install the test plugin:\n{result.stdout}{result.stderr}"
    yield
    subprocess.run([*pip, "uninstall", "-y", "mailrelay-test-thirdparty"], capture_output=True, timeout=120)


def relay_cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mailrelay", *args], capture_output=True, text=True,
                          timeout=60, **kw)


def test_relay_plugins_lists_builtin_and_thirdparty(thirdparty_installed):
    result = relay_cli("plugins", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    demo = rows["thirdparty-demo"]
    assert (demo["version"], demo["package"], demo["enabled"]) == ("1.2.3", "mailrelay-test-thirdparty", False)
    assert rows["eventlog"]["package"] == "mailrelay" and rows["eventlog"]["builtin"]
    enabled = {r["name"]: r for r in json.loads(relay_cli("--plugins", "thirdparty-demo", "plugins",
                                                          "--json").stdout)}
    assert enabled["thirdparty-demo"]["enabled"]
    assert {"on_rcpt_to", "on_receive", "relay_startup"} <= set(enabled["thirdparty-demo"]["hooks"])
    text = relay_cli("plugins").stdout
    assert "thirdparty-demo" in text and "mailrelay-test-thirdparty 1.2.3" in text


def test_daemon_discovers_and_calls_a_thirdparty_plugin(thirdparty_installed, relay_process, tmp_path):
    log_file = tmp_path / "demo.log"
    conf = tmp_path / "relay.conf"
    conf.write_text(f'[plugins]\nenable = ["thirdparty-demo"]\n\n[demo]\nlog_file = "{log_file}"\n')
    relay = relay_process("-c", str(conf))
    with smtplib.SMTP("127.0.0.1", relay.port) as client:
        refused = client.sendmail("a@example.test", ["blocked@example.test", "ok@example.test"], MSG)
    assert refused == {"blocked@example.test": (550, b"5.7.1 Recipient blocked by thirdparty-demo")}
    lines = log_file.read_text().splitlines()
    assert lines[0] == "startup"
    assert "refused blocked@example.test" in lines
    assert any(line.startswith("received emailrelay.") and line.endswith("from a@example.test")
               for line in lines)
