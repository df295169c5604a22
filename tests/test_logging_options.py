"""E-MailRelay's logging and process options: --syslog[=facility] (-k) over --no-syslog, --log-format,
--log-address, --debug (-g), and the accepted-but-ignored --hidden (-H), --show and --localedir.

Syslog goes to a Unix datagram socket the test binds (``[log] syslog_address``), read as rsyslog
would read /dev/log.
"""

from __future__ import annotations

import json
import re
import smtplib
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port, submit, wait_until
from mailrelay.cli import cli, expand_options_file, load
from mailrelay.config.loader import ConfigError

MSG = b"From: a@example.test\r\nTo: b@example.test\r\nSubject: logs\r\n\r\nhello\r\n"


@pytest.fixture(autouse=True)
def _no_config_from_the_environment(monkeypatch):
    monkeypatch.delenv("MAILRELAY_CONFIG", raising=False)


def parsed(*args: str):
    ctx = cli.make_context("relay", expand_options_file(list(args)))
    settings, _, _ = load(ctx.params["config"], {k: v for k, v in ctx.params.items() if k != "config"})
    return settings


class SyslogSocket:
    """A syslog daemon's end of /dev/log: datagrams ``<PRI>TAG: TEXT``."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.received: list[str] = []

    def config(self, directory: Path) -> Path:
        conf = directory / "relay.conf"
        conf.write_text(f'[log]\nsyslog_address = "{self.path}"\n')
        return conf

    def wait_for(self, needle: str, timeout: float = 10) -> str:
        self.sock.settimeout(timeout)
        while True:
            line = self.sock.recv(65536).decode()
            self.received.append(line)
            if needle in line:
                return line

    def drain(self) -> list[str]:
        self.sock.setblocking(False)
        try:
            while True:
                self.received.append(self.sock.recv(65536).decode())
        except BlockingIOError:
            return self.received


@pytest.fixture
def syslog(tmp_path):
    server = SyslogSocket(tmp_path / "log")
    yield server
    server.sock.close()


# ---------------------------------------------------------------- syslog
@pytest.mark.parametrize("option, priority", [(["--syslog=local0"], 16 * 8 + 6), (["-k"], 2 * 8 + 6),
                                              (["--syslog=daemon"], 3 * 8 + 6)])
def test_syslog_wins_over_no_syslog_with_its_facility(relay_process, syslog, tmp_path, option, priority):
    running = relay_process("-c", str(syslog.config(tmp_path)), *option)  # the fixture also gives --no-syslog
    assert submit(running.port, MSG) == (250, "")
    line = syslog.wait_for("from=<a@example.test>")
    assert re.match(rf"<{priority}>mailrelay\[{running.proc.pid}\]: info: session=s\d+ id=\S+ from=<a@", line), line


def test_no_syslog_keeps_syslog_quiet(relay_process, syslog, tmp_path):
    running = relay_process("-c", str(syslog.config(tmp_path)))
    assert submit(running.port, MSG) == (250, "")
    wait_until(lambda: "from=<a@example.test>" in running.log, what="the reception logged")
    assert syslog.drain() == []


def test_as_client_implies_no_syslog_unless_syslog_is_given():
    assert parsed("--as-client", "127.0.0.1:25").log.syslog is False
    assert parsed("--as-client", "127.0.0.1:25", "-k").log.syslog is True
    assert parsed("-k", "--no-syslog").log.syslog is True  # whatever the order
    assert parsed("--syslog=LOCAL3").log.syslog_facility == "local3"
    with pytest.raises(ConfigError, match="--syslog: invalid facility 'kern'"):
        parsed("--syslog=kern")


# ---------------------------------------------------------------- --log-format, --log-address
def session_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if "session=s" in line and "from=<a@example.test>" in line]


def test_log_format_time_and_address(relay_process):
    running = relay_process("--log-format=time,address")
    assert submit(running.port, MSG) == (250, "")
    [line] = wait_until(lambda: session_lines(running.log), what="the reception line")
    assert re.match(r"\d{8}\.\d{6}\.\d{3}: mailrelay: info: 127\.0\.0\.1; session=s\d+ id=", line), line
    started = next(line for line in running.log.splitlines() if "relay started" in line)
    assert "127.0.0.1;" not in started  # a line about no client has no address


def test_log_address_and_port(relay_process):
    running = relay_process("--log-address", "--log-format", "port")
    client_port = free_port()
    with smtplib.SMTP("127.0.0.1", running.port, timeout=10, source_address=("127.0.0.1", client_port)) as client:
        client.sendmail("a@example.test", ["b@example.test"], MSG)
    [line] = wait_until(lambda: session_lines(running.log), what="the reception line")
    assert line.startswith(f"mailrelay: info: 127.0.0.1;{client_port}: session=s"), line


def test_log_format_msgid_marks_forwarding_lines(relay_process):
    dead = free_port()  # nothing listens: the forwarding client logs the failed hop
    running = relay_process("--forward-to", f"127.0.0.1:{dead}", "--log-format=msgid")
    assert submit(running.port, MSG) == (250, "")
    line = wait_until(lambda: next((x for x in running.log.splitlines() if "cannot use" in x), ""),
                      what="the forwarding attempt")
    message_id = re.search(r"id=(\S+) cannot use", line).group(1)
    assert f"mailrelay: info: ({message_id}) id={message_id} cannot use 127.0.0.1:{dead}" in line


def test_log_fields_in_json_lines(relay_process, tmp_path):
    conf = tmp_path / "relay.conf"
    conf.write_text('[log]\nformat = "json"\n')
    running = relay_process("-c", str(conf), "--log-address")
    assert submit(running.port, MSG) == (250, "")
    line = wait_until(lambda: next((x for x in running.log.splitlines() if "from=<a@example.test>" in x), ""),
                      what="the reception line")
    record = json.loads(line)
    assert record["address"] == "127.0.0.1" and record["message"].startswith("session=")


def test_unknown_log_format_field_is_refused():
    assert parsed("--log-format", "time,unit", "--log-address").log.fields == ["time", "unit", "address"]
    with pytest.raises(ConfigError, match="--log-format: unknown field 'colour'"):
        parsed("--log-format=colour")


# ---------------------------------------------------------------- --debug, Windows-only, --localedir
def test_debug_logs_at_debug_level_with_the_protocol_trace(relay_process):
    running = relay_process("-g", "--localedir", "/usr/share/locale")
    with smtplib.SMTP("127.0.0.1", running.port, timeout=10) as client:
        client.ehlo("client.example")
        client.sendmail("a@example.test", ["b@example.test"], MSG)
    wait_until(lambda: "ehlo client.example" in running.log, what="the protocol trace")
    assert "mailrelay: debug: --localedir /usr/share/locale ignored: messages are not translated" in running.log
    assert parsed("--debug").log.verbose == parsed("-vv").log.verbose == 2
    assert parsed("-vvv", "-g").log.verbose == 3  # never less verbose than asked


def test_windows_only_options_are_accepted_and_ignored(relay_process):
    running = relay_process("-H", "--show", "window,tray", "--hidden")
    assert submit(running.port, MSG) == (250, "")
    assert parsed("-H", "--show", "tray") == parsed()


def test_logging_options_in_an_emailrelay_options_file(tmp_path):
    options = tmp_path / "emailrelay.conf"
    options.write_text("log\nsyslog local5\nlog-format time,msgid\nlog-address\ndebug\nhidden\nshow tray\n"
                       "localedir /usr/share/locale\nuser root\n")
    settings = parsed(str(options))
    assert (settings.log.enabled, settings.log.syslog, settings.log.syslog_facility, settings.log.fields,
            settings.log.verbose) == (True, True, "local5", ["time", "msgid", "address"], 2)
    assert (settings.server.localedir, settings.server.user) == ("/usr/share/locale", "root")
    bare = tmp_path / "bare.conf"
    bare.write_text("syslog\nno-syslog\n")
    assert (parsed(str(bare)).log.syslog, parsed(str(bare)).log.syslog_facility) == (True, "mail")


def test_short_forms(tmp_path):
    assert parsed("-k", "-g", "-H", "-u", "root") == parsed("--syslog", "--debug", "--hidden", "--user", "root")
    result = subprocess.run([sys.executable, "-m", "mailrelay", "--help"], capture_output=True, text=True, timeout=30)
    for option in ("-k, --syslog [FACILITY]", "--log-format FIELDS", "--log-address", "-g, --debug", "-H, --hidden",
                   "--show STYLE", "--localedir DIR", "-u, --user USERNAME"):
        assert option in result.stdout
