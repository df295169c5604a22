"""Unix domain sockets (``--interface /path``, E-MailRelay's form): mail arrives over a socket
file, the peer counts as local, the file gets the configured permissions, a file left by a dead
relay is replaced, a live one or a non-socket is refused, and the file goes away on shutdown."""

from __future__ import annotations

import os
import shutil
import signal
import smtplib
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from conftest import free_port, wait_for_port, wait_until

MESSAGE = b"Subject: over a Unix socket\r\n\r\nhello\r\n"
SYSTEM_PYTHON = "/usr/bin/python3"


class UnixSMTP(smtplib.SMTP):
    """smtplib over a Unix socket: the strict client, another transport."""

    def __init__(self, path: str | Path, timeout: float = 10.0):
        self.path = str(path)
        super().__init__(local_hostname="client.test", timeout=timeout)
        self.connect(self.path)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(self.path)
        return sock


def accepting(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
            return True
        except OSError:
            return False


def greets(path: Path) -> bool:
    """The server is up (not only the socket bound): it answers with its 220 greeting."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(5)
        try:
            probe.connect(str(path))
            return probe.recv(3) == b"220"
        except OSError:
            return False


def send_unix(path: Path, recipients: tuple[str, ...] = ("x@far.test",)) -> dict:
    with UnixSMTP(path) as client:
        return client.sendmail("a@example.test", list(recipients), MESSAGE)


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory other users may enter (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="relay-unix-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_mail_over_a_unix_socket_is_spooled_with_unix_in_the_received_header(relay_process, tmp_path):
    path = tmp_path / "smtp.sock"
    relay = relay_process("--interface", str(path), wait=False)
    wait_until(lambda: accepting(path), what="the Unix socket")
    assert send_unix(path) == {}
    [content] = [p.read_bytes() for p in relay.spool.glob("*.content")]
    assert content.startswith(b"Received: from client.test ([unix]) by relay.test with ESMTP id ")
    assert f"SMTP on {path};" in relay.log  # the banner names the socket
    assert stat.S_IMODE(path.stat().st_mode) == 0o660  # the default unix_socket_mode


def test_a_unix_client_is_local_so_relay_control_lets_it_relay(relay_process, tmp_path):
    # --remote-clients turns relay control on: remote TCP clients may only send to local domains.
    path = tmp_path / "smtp.sock"
    relay = relay_process("--interface", f"smtp={path}", "--interface", "smtp=127.0.0.1", "--remote-clients",
                          wait=False)
    wait_for_port(relay.port, relay.proc)
    wait_until(lambda: accepting(path), what="the Unix socket")
    assert send_unix(path, ("far@elsewhere.test",)) == {}
    # the same relay also serves TCP on the same listener list
    with smtplib.SMTP("127.0.0.1", relay.port, local_hostname="client.test", timeout=10) as client:
        assert client.sendmail("a@example.test", ["b@elsewhere.test"], MESSAGE) == {}
    assert len(list(relay.spool.glob("*.content"))) == 2


def test_socket_permissions_decide_who_may_connect(relay_process, tmp_path, public_dir):
    def connect_as_nobody(path: Path) -> str:
        probe = ("import socket,sys\ns=socket.socket(socket.AF_UNIX)\n"
                 "try:\n s.connect(sys.argv[1]); print(s.recv(100).decode().split()[0])\n"
                 "except PermissionError: print('denied')\n")
        # Debian's python3: the suite's interpreter may live where 'nobody' cannot read it.
        return subprocess.run([SYSTEM_PYTHON, "-c", probe, str(path)], user="nobody", capture_output=True,
                              text=True, timeout=30, cwd="/").stdout.strip()

    assert os.geteuid() == 0, "this test switches to the 'nobody' user: run the suite as root (CI does)"
    private = public_dir / "private.sock"
    conf = tmp_path / "relay.conf"
    conf.write_text('[server]\nunix_socket_mode = "0600"\n')
    relay_process("--config", str(conf), "--interface", str(private), wait=False)
    wait_until(lambda: accepting(private), what="the Unix socket")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert connect_as_nobody(private) == "denied"

    shared = public_dir / "shared.sock"
    conf.write_text('[server]\nunix_socket_mode = "0666"\n')
    relay_process("--config", str(conf), "--interface", str(shared), wait=False)
    wait_until(lambda: accepting(shared), what="the Unix socket")
    assert connect_as_nobody(shared) == "220"


def test_a_socket_left_by_a_dead_relay_is_replaced(relay_process, tmp_path):
    path = tmp_path / "smtp.sock"
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(str(path))
    leftover.close()  # the file stays, nobody listens: what a killed process leaves behind
    assert stat.S_ISSOCK(path.stat().st_mode) and not accepting(path)
    relay_process("--interface", str(path), wait=False)
    wait_until(lambda: accepting(path), what="the Unix socket")
    assert send_unix(path) == {}


def test_a_live_socket_is_not_taken_over(relay_process, tmp_path):
    path = tmp_path / "smtp.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(str(path))
        other.listen()
        relay = relay_process("--interface", str(path), wait=False)
        assert relay.proc.wait(30) == 2  # E-MailRelay's exit code for "cannot listen"
        assert f"relay: error: cannot listen on {path}: another process is listening there" in relay.log
        assert accepting(path)  # still the other process's socket


def test_a_file_that_is_not_a_socket_is_left_alone(relay_process, tmp_path):
    path = tmp_path / "smtp.sock"
    path.write_text("precious\n")
    relay = relay_process("--interface", str(path), wait=False)
    assert relay.proc.wait(30) == 2
    assert f"cannot listen on {path}: it exists and is not a socket" in relay.log
    assert path.read_text() == "precious\n"


def test_the_socket_file_is_removed_on_shutdown(relay_process, tmp_path):
    path = tmp_path / "smtp.sock"
    relay = relay_process("--interface", str(path), wait=False)
    wait_until(lambda: greets(path), what="the SMTP greeting on the Unix socket")
    assert relay.stop() == 0
    assert not path.exists()


def test_a_detached_daemon_keeps_its_socket_until_it_stops(tmp_path):
    # The starting process exits after the fork; it must not remove the daemon's socket file.
    path, pid_file = tmp_path / "smtp.sock", tmp_path / "relay.pid"
    with open(tmp_path / "stderr", "w") as stderr:  # the daemon keeps stderr: a file, not a pipe
        started = subprocess.run([sys.executable, "-m", "mailrelay", "--interface", str(path), "--spool-dir",
                                  str(tmp_path / "spool"), "--pid-file", str(pid_file), "--domain", "relay.test",
                                  "--port", str(free_port())], stdout=subprocess.PIPE, stderr=stderr, text=True,
                                 timeout=60)
    assert started.returncode == 0, (tmp_path / "stderr").read_text()
    assert f"SMTP on {path};" in started.stdout
    pid = int(pid_file.read_text())
    try:
        assert accepting(path)
        assert send_unix(path) == {}
    finally:
        os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not pid_file.exists(), what="the daemon to stop")
    assert not path.exists()


def test_unix_socket_mode_must_be_an_octal_mode(tmp_path):
    conf = tmp_path / "relay.conf"
    conf.write_text('[server]\nunix_socket_mode = "rw-rw----"\n')
    result = subprocess.run([sys.executable, "-m", "mailrelay", "check-config", str(conf)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1
    assert "relay.conf:2: [server] unix_socket_mode: 'rw-rw----' is not a file mode" in result.stderr
