"""The `relay` process: embedded default, detaching, pid file, exit codes, graceful shutdown."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path

from conftest import free_port, wait_for_port
from smtpwire import Wire


def gone(pid: int, timeout: float = 20) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # a zombie still answers kill(0): look at its state
        try:
            if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


def test_no_options_runs_detached_on_the_embedded_default(tmp_path):
    """A newcomer types `relay`: it detaches, says where it listens and spools, and takes mail."""
    env = {**os.environ, "HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path / "data")}
    env.pop("MAILRELAY_CONFIG", None)
    # The daemon keeps stderr open for warnings (as E-MailRelay does): give it a file, not a pipe.
    with open(tmp_path / "stderr", "w") as stderr:
        started = subprocess.run([sys.executable, "-m", "mailrelay"], stdout=subprocess.PIPE, stderr=stderr,
                                 text=True, env=env, timeout=30, cwd=tmp_path)
    assert started.returncode == 0, (tmp_path / "stderr").read_text()
    spool = tmp_path / "data" / "mailrelay" / "spool"
    match = re.search(r"SMTP on 127\.0\.0\.1:2525; spool (\S+); pid (\d+)", started.stdout)
    assert match, started.stdout
    assert match.group(1) == str(spool)
    pid = int(match.group(2))
    try:
        with smtplib.SMTP("127.0.0.1", 2525, timeout=10) as client:
            client.sendmail("a@example.test", ["b@example.test"], b"Subject: first try\r\n\r\nhello\r\n")
        assert len(list(spool.glob("*.envelope"))) == 1
    finally:
        os.kill(pid, signal.SIGTERM)
        assert gone(pid)


def test_detached_daemon_writes_and_removes_its_pid_file(tmp_path):
    port, pid_file = free_port(), tmp_path / "run" / "relay.pid"
    started = subprocess.run([sys.executable, "-m", "mailrelay", "--port", str(port), "--spool-dir",
                              str(tmp_path / "spool"), "--pid-file", str(pid_file), "--as-server"],
                             capture_output=True, text=True, timeout=30)
    assert started.returncode == 0, started.stderr
    pid = int(pid_file.read_text())
    assert f"pid {pid}" in started.stdout
    wait_for_port(port)
    os.kill(pid, signal.SIGTERM)
    assert gone(pid)
    assert not pid_file.exists()


def test_port_in_use_is_exit_code_2(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for mode in ([], ["--no-daemon"]):
            result = subprocess.run([sys.executable, "-m", "mailrelay", *mode, "--port", str(port),
                                     "--spool-dir", str(tmp_path / "spool")],
                                    capture_output=True, text=True, timeout=30)
            assert result.returncode == 2, (mode, result.stderr)
            assert f"port {port}" in result.stderr and "in use" in result.stderr.lower()


def test_unwritable_spool_location_is_a_clear_start_up_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = subprocess.run([sys.executable, "-m", "mailrelay", "--no-daemon", "--port", str(free_port()),
                             "--spool-dir", str(blocker / "spool")], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "relay: error:" in result.stderr and str(blocker) in result.stderr


def test_sigterm_says_421_to_idle_sessions_and_finishes_a_message_in_flight(relay_process):
    relay = relay_process()
    idle = Wire(relay.port)
    idle.greet()
    busy = Wire(relay.port)
    busy.greet()
    busy.cmd("MAIL FROM:<a@example.test>")
    busy.cmd("RCPT TO:<b@example.test>")
    assert busy.cmd("DATA")[0] == 354
    busy.send(b"Subject: in flight\r\n\r\nfirst half\r\n")

    relay.proc.send_signal(signal.SIGTERM)
    assert idle.reply()[0] == 421
    assert idle.closed()
    busy.send(b"second half\r\n.\r\n")
    code, text = busy.reply()
    assert code == 250, text
    assert busy.reply()[0] == 421  # then it is told the service is going away
    assert relay.proc.wait(20) == 0
    [envelope] = relay.spool.glob("*.envelope")
    content = envelope.with_name(envelope.name.replace(".envelope", ".content")).read_bytes()
    assert content.endswith(b"first half\r\nsecond half\r\n")
    for w in (idle, busy):
        w.close()


def test_new_connections_are_refused_once_shutting_down(relay_process):
    relay = relay_process()
    held = Wire(relay.port)
    held.greet()
    held.cmd("MAIL FROM:<a@example.test>")
    held.cmd("RCPT TO:<b@example.test>")
    held.cmd("DATA")  # keeps the relay in its grace period
    relay.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while True:  # the listening socket closes at once; connecting is then refused
        try:
            socket.create_connection(("127.0.0.1", relay.port), 2).close()
        except ConnectionRefusedError:
            break
        assert time.monotonic() < deadline, "still accepting connections after SIGTERM"
        time.sleep(0.05)
    held.send(b"x\r\n.\r\n")
    assert held.reply()[0] == 250
    held.close()
    assert relay.proc.wait(20) == 0
