"""The `relay` command as an operator runs it: check-config, plugins, E-MailRelay's options (short
and long, and in an options file), and the command line overriding relay.conf."""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import RelayProcess, free_port, wait_for_port
from mailrelay import __version__
from mailrelay.cli import cli, expand_options_file, load
from mailrelay.config import Settings

RELAY_SCRIPT = Path(sys.executable).parent / "relay"
MESSAGE = "From: a@example.com\r\nTo: b@example.net\r\nSubject: test\r\n\r\nhello\r\n"


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MAILRELAY_CONFIG"}
    env.update(extra)
    return env


def relay(*args: str, env: dict[str, str] | None = None, command: list[str] | None = None
          ) -> subprocess.CompletedProcess[str]:
    """Run `python -m mailrelay ARGS` (or another command form) to completion."""
    command = command or [sys.executable, "-m", "mailrelay"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL, env=env or clean_env())


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def listening_ports(pid: int) -> set[int]:
    """TCP ports process ``pid`` is listening on (from /proc: the process's own sockets only)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


@pytest.fixture
def foreground(tmp_path: Path):
    """Factory: `python -m mailrelay ARGS` with exactly these arguments (no defaults added); waits
    for ``port`` when given; stopped at teardown."""
    started: list[RelayProcess] = []

    def start(*args: str, port: int | None = None) -> RelayProcess:
        proc = RelayProcess(list(args), tmp_path / "spool", port or 0,
                            tmp_path / f"relay{len(started)}.log", clean_env())
        started.append(proc)
        if port:
            wait_for_port(port, proc.proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


def wait_for_banner(relay_process: RelayProcess, timeout: float = 15) -> str:
    """The start-up line (printed once the relay serves) from a relay without an SMTP port."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for line in relay_process.log.splitlines():
            if line.startswith(f"mailrelay {__version__}: "):
                return line
        if relay_process.proc.poll() is not None:
            raise RuntimeError(f"relay exited with {relay_process.proc.returncode}:\n{relay_process.log}")
        time.sleep(0.05)
    raise TimeoutError("no start-up banner")


def exited(pid: int, timeout: float = 15) -> bool:
    """Whether a detached relay (not our child, so not ours to wait for) has exited."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                return True  # exited; its new parent has not reaped it yet
        except OSError:
            return True
        time.sleep(0.05)
    return False


def parsed(*args: str) -> Settings:
    """Settings from command-line arguments, parsed in-process exactly as `relay ARGS` would."""
    ctx = cli.make_context("relay", expand_options_file(list(args)))
    given: dict[str, Any] = {k: v for k, v in ctx.params.items() if k != "config"}
    settings, _, _ = load(ctx.params["config"], given)
    return settings


@pytest.fixture(autouse=True)
def _no_config_from_the_environment(monkeypatch):
    monkeypatch.delenv("MAILRELAY_CONFIG", raising=False)


# ---------------------------------------------------------------- check-config
@pytest.mark.parametrize("command", [[sys.executable, "-m", "mailrelay"], [str(RELAY_SCRIPT)]],
                         ids=["python-m", "console-script"])
def test_check_config_says_ok_for_a_valid_file(tmp_path, command):
    conf = write(tmp_path / "relay.conf", """
        [smtp]
        port = 2627

        [spool]
        dir = "/srv/mail/spool"

        [plugins]
        enable = ["eventlog"]
        """)
    result = relay("check-config", str(conf), command=command)
    assert result.returncode == 0, result.stderr
    assert f"{conf}: OK" in result.stdout
    assert "plugins: eventlog" in result.stdout
    assert "SMTP port 2627" in result.stdout
    assert result.stderr == ""


def test_check_config_reports_the_problem_and_exits_1(tmp_path):
    conf = write(tmp_path / "relay.conf", '[smtp]\nport = "abc"\n')
    result = relay("check-config", str(conf))
    assert result.returncode == 1
    assert "OK" not in result.stdout
    assert f"{conf}:2: [smtp] port: expected an integer, got 'abc'" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_warns_about_a_section_nobody_reads_but_passes(tmp_path):
    conf = write(tmp_path / "relay.conf", "[smtp]\nport = 2628\n\n[spamd]\nhost = \"x\"\n")
    result = relay("check-config", str(conf))
    assert result.returncode == 0
    assert "OK" in result.stdout
    assert f"warning: {conf}:4: [spamd]: no enabled plugin declares this section" in result.stderr


def test_check_config_catches_a_filter_scheme_no_plugin_claims(tmp_path):
    conf = write(tmp_path / "relay.conf", '[filters]\nserver = ["exit:0", "spamm:127.0.0.1:783"]\n')
    result = relay("check-config", str(conf))
    assert result.returncode == 1
    assert "OK" not in result.stdout
    assert "filter 'spamm:127.0.0.1:783': unknown scheme 'spamm'" in result.stderr
    assert "spam:" in result.stderr  # the known schemes are listed
    conf.write_text('[filters]\nserver = ["exit:0"]\nreject_code = 250\n')
    assert "reject_code 250 is not a 4xx or 5xx code" in relay("check-config", str(conf)).stderr


def test_check_config_of_a_missing_file_fails(tmp_path):
    result = relay("check-config", str(tmp_path / "missing.conf"))
    assert result.returncode == 1
    assert f"{tmp_path / 'missing.conf'}: no such configuration file" in result.stderr


# ---------------------------------------------------------------- relay plugins
def enabled_plugins(result: subprocess.CompletedProcess[str]) -> dict[str, bool]:
    assert result.returncode == 0, result.stderr
    return {row["name"]: row["enabled"] for row in json.loads(result.stdout)}


def test_plugins_reads_the_file_from_dash_c_or_the_environment(tmp_path):
    conf = write(tmp_path / "relay.conf", '[plugins]\nenable = ["eventlog"]\n')
    empty = write(tmp_path / "empty.conf", "")

    assert enabled_plugins(relay("plugins", "--json"))["eventlog"] is False
    assert enabled_plugins(relay("-c", str(conf), "plugins", "--json"))["eventlog"] is True
    assert enabled_plugins(relay("plugins", "--json", env=clean_env(MAILRELAY_CONFIG=str(conf))))[
        "eventlog"] is True
    # --config wins over $MAILRELAY_CONFIG.
    assert enabled_plugins(relay("-c", str(empty), "plugins", "--json",
                                 env=clean_env(MAILRELAY_CONFIG=str(conf))))["eventlog"] is False


def test_plugins_lists_the_builtin_eventlog_with_its_hooks(tmp_path):
    result = relay("--plugins", "eventlog", "plugins", "--json")
    (row,) = [r for r in json.loads(result.stdout) if r["name"] == "eventlog"]
    assert row["enabled"] is True
    assert row["builtin"] is True
    assert "on_event" in row["hooks"]
    text = relay("--plugins", "eventlog", "plugins")
    assert text.stdout.split()[:2] == ["eventlog", "enabled"]


@pytest.mark.parametrize("how", ["config", "option"])
def test_an_unknown_plugin_is_an_error_listing_the_known_ones(tmp_path, how):
    conf = write(tmp_path / "relay.conf", '[plugins]\nenable = ["eventlog", "nosuch"]\n')
    args = ["-c", str(conf)] if how == "config" else ["--plugins", "nosuch"]
    result = relay(*args, "plugins", "--json")
    assert result.returncode == 1
    assert "unknown plugin 'nosuch'" in result.stderr
    assert "known plugins: " in result.stderr and "eventlog" in result.stderr
    assert result.stdout == ""


def test_a_mistyped_number_on_the_command_line_is_an_error_not_a_traceback():
    result = relay("--port", "abc", "plugins")
    assert result.returncode == 1
    assert "command line: [smtp] port: expected an integer, got 'abc'" in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------- the command line wins
def test_the_command_line_port_overrides_the_file(relay_process, tmp_path):
    file_port = free_port()
    conf = write(tmp_path / "relay.conf", f"""
        [smtp]
        port = {file_port}

        [server]
        domain = "file.example"
        """)
    running = relay_process("-c", str(conf))  # adds --port, --spool-dir and --domain relay.test

    with smtplib.SMTP("127.0.0.1", running.port, timeout=10) as client:
        code, greeting = client.ehlo("client.example")
    assert code == 250
    assert greeting.startswith(b"relay.test")
    assert listening_ports(running.proc.pid) == {running.port}
    assert f"SMTP on 127.0.0.1:{running.port};" in running.log
    assert running.stop() == 0


def test_the_banner_greets_on_connect(relay_process):
    running = relay_process()
    with smtplib.SMTP(timeout=10) as client:
        code, text = client.connect("127.0.0.1", running.port)
    assert code == 220
    assert text.startswith(b"relay.test")


# ---------------------------------------------------------------- E-MailRelay options file
def test_an_emailrelay_options_file_configures_the_relay(foreground, tmp_path):
    port = free_port()
    spool = tmp_path / "my spool"
    options = write(tmp_path / "emailrelay.conf", f"""
        # E-MailRelay options, one per line
        port {port}
        spool-dir "{spool}"
        domain relay.example
        remote-clients
        log yes
        verbose no
        no-syslog
        server-smtp-config -pipelining
        """)
    running = foreground("--no-daemon", str(options), port=port)

    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.example")
        assert not client.has_extn("pipelining")
        client.sendmail("a@example.com", ["b@example.net"], MESSAGE)

    (content,) = spool.glob("*.content")
    assert "by relay.example with ESMTP" in content.read_text()
    assert list(spool.glob("*.envelope"))
    assert f"SMTP on 0.0.0.0:{port}" in running.log       # remote-clients: every address
    assert "info: relay started" in running.log          # log yes
    assert "debug:" not in running.log                   # verbose no
    assert running.stop() == 0


def test_the_command_line_wins_over_the_options_file(foreground, tmp_path):
    file_port, port = free_port(), free_port()
    options = write(tmp_path / "emailrelay.conf", f"""
        port {file_port}
        domain file.example
        spool-dir {tmp_path / "file-spool"}
        """)
    running = foreground("-t", "-n", "--port", str(port), "-D", "cli.example",
                               str(options), port=port)
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        _, greeting = client.ehlo("client.example")
    assert greeting.startswith(b"cli.example")
    assert listening_ports(running.proc.pid) == {port}
    assert f"spool {tmp_path / 'file-spool'};" in running.log  # what the command line left alone
    assert running.stop() == 0


def test_an_unknown_option_in_the_options_file_is_a_readable_error(tmp_path):
    options = write(tmp_path / "emailrelay.conf", "# options\nport 2599\nfrobnicate 5\n")
    result = relay("-t", str(options))
    assert result.returncode == 1
    assert f"{options}:3: unknown option 'frobnicate'" in result.stderr
    assert "Traceback" not in result.stderr


def test_command_line_and_options_file_combine_like_emailrelay(tmp_path):
    options = write(tmp_path / "emailrelay.conf", "port 2599\ndomain file.example\nlog\nverbose\n")
    settings = parsed("-p", "2600", "-v", str(options))
    assert settings.smtp.port == 2600            # the command line wins
    assert settings.server.domain == "file.example"
    assert settings.log.enabled is True
    assert settings.log.verbose == 2             # counted from both


# ---------------------------------------------------------------- --server-smtp-config
@pytest.mark.parametrize("args, pipelining", [
    ((), True),
    (("--server-smtp-config", "-pipelining"), False),
    (("-Z", "nopipelining,+smtputf8"), False),
])
def test_server_smtp_config_controls_the_ehlo_reply(relay_process, args, pipelining):
    running = relay_process(*args)
    with smtplib.SMTP("127.0.0.1", running.port, timeout=10) as client:
        client.ehlo("client.example")
        assert client.has_extn("pipelining") is pipelining
        assert client.has_extn("smtputf8")


@pytest.mark.parametrize("config, problem", [
    ("+chunking", "chunking (BDAT) is not supported by this relay"),
    ("pipelining,bogus", "unknown keyword 'bogus' (known: alabels, chunking, linger, pipelining"),
])
def test_server_smtp_config_refuses_what_it_cannot_do(tmp_path, config, problem):
    port = free_port()
    result = relay("-t", "-p", str(port), "-s", str(tmp_path / "spool"), "-Z", config)
    assert result.returncode == 1
    assert f"--server-smtp-config: {problem}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "spool").exists()  # refused before anything started


# ---------------------------------------------------------------- short and long forms
def test_dash_capital_v_prints_the_version():
    for flag in ("-V", "--version"):
        result = relay(flag)
        assert result.returncode == 0
        assert __version__ in result.stdout


def test_dash_h_lists_the_emailrelay_options():
    short, long = relay("-h"), relay("--help")
    assert short.returncode == 0
    assert short.stdout == long.stdout
    for option in ("-s, --spool-dir", "-p, --port", "-X, --no-smtp", "-Z, --server-smtp-config",
                   "check-config", "plugins"):
        assert option in short.stdout


@pytest.mark.parametrize("short, long, setting, expected", [
    (["-p", "2600"], ["--port", "2600"], "smtp.port", 2600),
    (["-I", "127.0.0.1,::1"], ["--interface", "127.0.0.1", "--interface", "::1"], "smtp.interface",
     ["127.0.0.1", "::1"]),
    (["-s", "/srv/spool"], ["--spool-dir", "/srv/spool"], "spool.dir", "/srv/spool"),
    (["-D", "relay.example"], ["--domain", "relay.example"], "server.domain", "relay.example"),
    (["-r"], ["--remote-clients"], "smtp.remote_clients", True),
    (["-M", "2000"], ["--size", "2000"], "smtp.size", 2000),
    (["-t"], ["--no-daemon"], "server.daemon", False),
    (["-d"], ["--as-server"], "log.close_stderr", True),
    (["-d"], ["--as-server"], "log.enabled", True),
    (["-l"], ["--log"], "log.enabled", True),
    (["-vv"], ["--verbose", "--verbose"], "log.verbose", 2),
    (["-N", "/var/log/r-%d"], ["--log-file", "/var/log/r-%d"], "log.file", "/var/log/r-%d"),
    (["-i", "/run/r.pid"], ["--pid-file", "/run/r.pid"], "server.pid_file", "/run/r.pid"),
    (["-w", "7.5"], ["--prompt-timeout", "7.5"], "client.prompt_timeout", 7.5),
    (["-Z", "-pipelining"], ["--server-smtp-config", "-pipelining"], "smtp.pipelining", False),
    (["-X"], ["--no-smtp"], "smtp.enabled", False),
    (["-n"], ["--no-syslog"], "log.syslog", False),
    (["-L"], ["--log-time"], "log.time", True),
    (["-e"], ["--close-stderr"], "log.close_stderr", True),
], ids=lambda v: v[0] if isinstance(v, list) else None)
def test_short_and_long_forms_mean_the_same(short, long, setting, expected):
    section, key = setting.split(".")
    by_short, by_long = parsed(*short), parsed(*long)
    assert getattr(getattr(by_short, section), key) == expected
    assert by_short == by_long
    assert getattr(getattr(parsed(), section), key) != expected  # not simply the default


def test_dash_capital_m_refuses_a_bigger_message_with_552(relay_process):
    running = relay_process("-M", "2000")
    with smtplib.SMTP("127.0.0.1", running.port, timeout=10) as client:
        client.ehlo("client.example")
        assert client.esmtp_features["size"] == "2000"
        client.mail("a@example.com")
        client.rcpt("b@example.net")
        big = MESSAGE + ("x" * 98 + "\r\n") * 30
        assert len(big) > 3000
        code, text = client.data(big)
        assert code == 552, text
        client.rset()
        assert client.sendmail("a@example.com", ["b@example.net"], MESSAGE) == {}
    assert len(list(running.spool.glob("*.content"))) == 1


def test_short_options_run_a_relay(foreground, tmp_path):
    port = free_port()
    spool = tmp_path / "spool"
    running = foreground("-t", "-l", "-n", "-vv", "-p", str(port), "-I", "127.0.0.1",
                               "-s", str(spool), "-D", "short.example", "-w", "5", port=port)
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.example")
        client.sendmail("a@example.com", ["b@example.net"], MESSAGE)
    (content,) = spool.glob("*.content")
    assert "by short.example" in content.read_text()
    assert f"SMTP on 127.0.0.1:{port};" in running.log
    assert "ehlo client.example" in running.log  # -vv logs the SMTP conversation
    assert running.stop() == 0


def test_dash_capital_x_runs_without_smtp_and_dash_i_keeps_a_pid_file(foreground, tmp_path):
    pid_file = tmp_path / "run" / "relay.pid"
    running = foreground("-t", "-n", "-X", "-i", str(pid_file), "-s", str(tmp_path / "spool"))
    banner = wait_for_banner(running)
    assert "SMTP on (SMTP disabled)" in banner
    assert pid_file.read_text() == f"{running.proc.pid}\n"
    assert listening_ports(running.proc.pid) == set()
    assert running.stop() == 0
    assert not pid_file.exists()


def test_as_server_detaches_logs_and_closes_stderr(tmp_path):
    pid_file = tmp_path / "relay.pid"
    # Returns at all only because the daemon let go of stdout and (with -d) of stderr.
    result = relay("-d", "-n", "-X", "-s", str(tmp_path / "spool"), "-i", str(pid_file))
    assert result.returncode == 0, result.stderr
    pid = int(pid_file.read_text())
    try:
        assert f"pid {pid}" in result.stdout
        assert "SMTP disabled" in result.stdout
        assert listening_ports(pid) == set()
    finally:
        os.kill(pid, signal.SIGTERM)
    end = time.monotonic() + 15
    while pid_file.exists() and time.monotonic() < end:
        time.sleep(0.05)
    assert not pid_file.exists()


def test_dash_capital_n_logs_to_a_dated_file(foreground, tmp_path):
    days = {time.strftime("%Y%m%d")}
    running = foreground("-t", "-l", "-n", "-X", "-N", str(tmp_path / "logs" / "relay-%d.log"),
                               "-s", str(tmp_path / "spool"))
    wait_for_banner(running)
    assert running.stop() == 0
    days.add(time.strftime("%Y%m%d"))
    (log_file,) = (tmp_path / "logs").iterdir()
    assert log_file.name in {f"relay-{day}.log" for day in days}
    text = log_file.read_text()
    assert "info: relay started" in text
    assert "info: relay stopped" in text
    assert "relay started" not in running.log  # the file, not stderr


def test_dash_capital_x_alone_detaches_and_listens_nowhere(tmp_path):
    env = clean_env(HOME=str(tmp_path), XDG_DATA_HOME=str(tmp_path / "data"))
    # A detached relay keeps stderr for warnings (as E-MailRelay does): give it a file, not a pipe.
    with open(tmp_path / "stderr", "w") as stderr:
        started = subprocess.run([sys.executable, "-m", "mailrelay", "-X"], stdout=subprocess.PIPE,
                                 stderr=stderr, stdin=subprocess.DEVNULL, text=True, env=env, timeout=30,
                                 cwd=tmp_path)
    assert started.returncode == 0, (tmp_path / "stderr").read_text()
    match = re.search(r"SMTP on \(SMTP disabled\); spool (\S+); pid (\d+)", started.stdout)
    assert match, started.stdout
    pid = int(match.group(2))
    try:
        assert match.group(1) == str(tmp_path / "data" / "mailrelay" / "spool")
        assert listening_ports(pid) == set()
    finally:
        os.kill(pid, signal.SIGTERM)
    assert exited(pid)
