"""Socket activation and readiness, as systemd does them: listening sockets passed as descriptors
3, 4, ... with ``LISTEN_FDS``/``LISTEN_PID``/``LISTEN_FDNAMES`` (sd_listen_fds(3)), E-MailRelay's
``--interface fd#N``, and ``READY=1``/``STOPPING=1`` on ``NOTIFY_SOCKET`` (``Type=notify``).

systemd-socket-activate (from Debian's systemd package) is the real launcher where it fits; a
small Python launcher in this file does what it cannot (a socket it did not bind, a stray
``LISTEN_PID``), the same way: descriptors from 3 on, ``LISTEN_PID`` = its own pid, then exec.
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from conftest import free_port, require, submit, wait_until
from mailrelay import systemd
from test_unix_sockets import send_unix

MESSAGE = b"Subject: socket activation\r\n\r\nhello\r\n"
RELAY = [sys.executable, "-m", "mailrelay", "--no-daemon", "--log", "--no-syslog", "--domain", "relay.test"]

# Descriptors to 3, 4, ... (via high copies, so none is overwritten before it is copied), the
# variables as systemd sets them, LISTEN_PID this process's pid (exec keeps it), then exec.
LAUNCHER = r"""
import fcntl, os, sys
fds, names, pid, argv = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
fds = [int(fd) for fd in fds.split(",") if fd]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
for fd in fds:
    os.close(fd)
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
    os.close(fd)
os.environ.update(LISTEN_FDS=str(len(fds)), LISTEN_PID=pid if pid != "self" else str(os.getpid()))
if names:
    os.environ["LISTEN_FDNAMES"] = names
os.execv(argv[0], argv)
"""


class NotifySocket:
    """The service manager's end of NOTIFY_SOCKET: a datagram socket, abstract or a path."""

    def __init__(self, path: Path | None = None):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if path is None:
            name = f"mailrelay-test-{uuid.uuid4().hex}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            self.sock.bind(str(path))
            self.address = str(path)

    def receive(self, timeout: float = 30.0) -> dict[str, str]:
        """The next notification as ``{KEY: VALUE}``."""
        self.sock.settimeout(timeout)
        datagram = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in datagram.splitlines())

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    sock = NotifySocket()
    yield sock
    sock.close()


def listening(port: int) -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


class Launched:
    """A relay started by a launcher: its process, log, and a clean stop."""

    def __init__(self, proc: subprocess.Popen, log: Path):
        self.proc, self.log_path = proc, log

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def exit_code(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


@pytest.fixture
def launch(tmp_path: Path) -> Iterator:
    """Factory: run the relay with ``sockets`` (or descriptors) inherited: under the Python
    launcher as descriptors 3, 4, ... with ``names``; or, with ``names=False``, as they are,
    without the variables (for ``--interface fd#N``)."""
    started: list[Launched] = []

    def start(sockets: list[socket.socket | int], names: str | None | bool, *args: str, listen_pid: str = "self",
              env: dict[str, str] | None = None) -> Launched:
        log = tmp_path / f"launched{len(started)}.log"
        fds = [s if isinstance(s, int) else s.fileno() for s in sockets]
        relay = [*RELAY, "--spool-dir", str(tmp_path / f"spool{len(started)}"), *args]
        if names is not False:
            relay = [sys.executable, "-c", LAUNCHER, ",".join(map(str, fds)), names or "", listen_pid, *relay]
        with open(log, "wb") as out:
            proc = subprocess.Popen(relay, pass_fds=fds, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})
        launched = Launched(proc, log)
        started.append(launched)
        return launched

    yield start
    for launched in started:
        launched.stop()


# ---------------------------------------------------------------- systemd-socket-activate
def test_systemd_socket_activate_starts_the_relay_on_the_first_connection(tmp_path, notify_socket):
    tool = require("systemd-socket-activate")
    smtp_port, submission_port, configured_port = free_port(), free_port(), free_port()
    log = tmp_path / "activate.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([tool, "-l", f"127.0.0.1:{smtp_port}", "-l", f"127.0.0.1:{submission_port}",
                                 "--fdname=smtp:submission", "-E", f"NOTIFY_SOCKET={notify_socket.address}",
                                 *RELAY, "--port", str(configured_port), "--spool-dir", str(tmp_path / "spool")],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_until(lambda: log.read_text().count("Listening on") == 2, what="systemd-socket-activate")
        # The relay is not running yet: this first client starts it, and is served once it is up.
        assert submit(smtp_port, MESSAGE) == (250, "")
        ready = notify_socket.receive()
        assert ready["READY"] == "1"
        assert ready["STATUS"] == f"SMTP on 127.0.0.1:{smtp_port}, 127.0.0.1:{submission_port}"
        assert submit(submission_port, MESSAGE) == (250, "")  # submission sockets are SMTP listeners too
        with pytest.raises(ConnectionRefusedError):  # the configured port is not bound as well
            socket.create_connection(("127.0.0.1", configured_port), 5).close()
        assert len(list((tmp_path / "spool").glob("*.content"))) == 2
        proc.send_signal(signal.SIGTERM)
        assert notify_socket.receive() == {"STOPPING": "1", "STATUS": "shutting down"}
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_an_unknown_socket_name_is_a_startup_error(tmp_path):
    tool = require("systemd-socket-activate")
    port = free_port()
    log = tmp_path / "activate.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([tool, "-l", f"127.0.0.1:{port}", "--fdname=imap", *RELAY, "--spool-dir",
                                 str(tmp_path / "spool")], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    wait_until(lambda: "Listening on" in log.read_text(), what="systemd-socket-activate")
    socket.create_connection(("127.0.0.1", port), 5).close()  # starts the relay
    assert proc.wait(30) == 1
    assert ("relay: error: socket activation: unknown socket name 'imap' in LISTEN_FDNAMES "
            "(FileDescriptorName= must be one of smtp, submission, pop, admin)") in log.read_text()


# ---------------------------------------------------------------- the Python launcher
def test_a_notify_socket_path_gets_ready_and_stopping(launch, tmp_path):
    notify = NotifySocket(tmp_path / "notify")
    port = free_port()
    with listening(port) as sock:
        relay = launch([sock], "smtp", env={"NOTIFY_SOCKET": notify.address})
        assert notify.receive()["READY"] == "1"
    # READY means accepting: no waiting for the port
    assert submit(port, MESSAGE) == (250, "")
    relay.proc.send_signal(signal.SIGTERM)
    assert notify.receive()["STOPPING"] == "1"
    assert relay.exit_code() == 0
    notify.close()


def test_unnamed_sockets_are_smtp_and_nothing_else_is_bound(launch):
    port, configured = free_port(), free_port()
    with listening(port) as sock:
        relay = launch([sock], None, "--port", str(configured))  # no LISTEN_FDNAMES: "unknown"
    wait_until(lambda: "SMTP on" in relay.log, what="the relay")
    assert f"SMTP on 127.0.0.1:{port};" in relay.log
    assert submit(port, MESSAGE) == (250, "")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", configured), 5).close()


def test_inherited_descriptors_are_close_on_exec(launch):
    # Filters and other children must not hold the listener open (nor see the variables: below).
    port = free_port()
    with listening(port) as sock:
        relay = launch([sock], "smtp")
    wait_until(lambda: "SMTP on" in relay.log, what="the relay")
    flags = Path(f"/proc/{relay.proc.pid}/fdinfo/3").read_text().split("flags:")[1].split()[0]
    assert int(flags, 8) & os.O_CLOEXEC


def test_a_listen_pid_of_another_process_is_ignored(launch):
    port, configured = free_port(), free_port()
    with listening(port) as sock:
        relay = launch([sock], "smtp", "--port", str(configured), listen_pid="1")
    wait_until(lambda: "SMTP on" in relay.log, what="the relay")
    assert f"SMTP on 127.0.0.1:{configured};" in relay.log  # its own port, not the passed socket
    assert submit(configured, MESSAGE) == (250, "")


def test_a_pop_socket_goes_to_the_pop3_server(launch, tmp_path):
    secrets = tmp_path / "pop.auth"
    secrets.write_text("server plain alice secret\n")
    smtp_port, pop_port, configured_pop = free_port(), free_port(), free_port()
    with listening(smtp_port) as smtp, listening(pop_port) as pop:
        relay = launch([smtp, pop], "smtp:pop", "--pop", "--pop-auth", str(secrets), "--pop-port",
                       str(configured_pop))
    wait_until(lambda: "SMTP on" in relay.log, what="the relay")
    with socket.create_connection(("127.0.0.1", pop_port), 10) as client:
        assert client.recv(100).startswith(b"+OK")
    with pytest.raises(ConnectionRefusedError):  # the configured POP3 port is not bound as well
        socket.create_connection(("127.0.0.1", configured_pop), 5).close()


def test_a_pop_socket_without_the_pop3_server_is_a_startup_error(launch):
    smtp_port, pop_port = free_port(), free_port()
    with listening(smtp_port) as smtp, listening(pop_port) as pop:
        relay = launch([smtp, pop], "smtp:pop")
    assert relay.exit_code() == 1
    assert "socket activation passed 1 socket(s) named 'pop' but nothing serves them" in relay.log


def test_a_mismatched_fdnames_list_is_a_startup_error(launch):
    with listening(free_port()) as sock:
        relay = launch([sock], "smtp:submission")
    assert relay.exit_code() == 1
    assert "relay: error: socket activation: LISTEN_FDNAMES names 2 socket(s) but LISTEN_FDS=1" in relay.log


def test_an_inherited_unix_socket_is_served_and_left_to_its_owner(launch, tmp_path):
    path = tmp_path / "smtp.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen()
    relay = launch([sock], "smtp")
    sock.close()
    wait_until(lambda: "SMTP on" in relay.log, what="the relay")
    assert f"SMTP on {path};" in relay.log
    assert send_unix(path) == {}
    assert relay.stop() == 0
    assert path.exists()  # the service manager made the file; it removes it


# ---------------------------------------------------------------- --interface fd#N
def test_interface_fd_form_serves_an_inherited_socket(launch):
    port = free_port()
    with listening(port) as sock:
        relay = launch([sock], False, "--interface", f"smtp=fd#{sock.fileno()}")
    wait_until(lambda: f"SMTP on 127.0.0.1:{port};" in relay.log, what="the relay")
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30) as client:
        assert client.sendmail("a@example.test", ["b@far.test"], MESSAGE) == {}


def test_interface_fd_form_refuses_what_is_not_a_listening_socket(launch, tmp_path):
    with open(tmp_path / "file", "w") as f:
        relay = launch([f.fileno()], False, "--interface", f"fd#{f.fileno()}")
    assert relay.exit_code() == 1
    assert re.search(r"relay: error: --interface fd#\d+: file descriptor \d+ is not an open socket", relay.log)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as datagram:
        relay = launch([datagram], False, "--interface", f"fd#{datagram.fileno()}")
    assert relay.exit_code() == 1
    assert "is not a listening stream socket" in relay.log
    relay = launch([], False, "--interface", "fd#x")
    assert relay.exit_code() == 1
    assert "relay: error: --interface 'fd#x': expected fd#NUMBER" in relay.log


# ---------------------------------------------------------------- sd_listen_fds and sd_notify
def test_listen_fds_reads_and_removes_the_variables():
    env = {"LISTEN_PID": "4242", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "smtp:pop", "OTHER": "x"}
    assert systemd.listen_fds(env, pid=1) == []  # meant for process 4242: ignored, and removed
    assert env == {"OTHER": "x"}
    with pytest.raises(ValueError, match="LISTEN_FDS='three' is not a number"):
        systemd.listen_fds({"LISTEN_PID": "7", "LISTEN_FDS": "three"}, pid=7)
    assert systemd.listen_fds({}, pid=7) == []


def test_notifier_takes_notify_socket_from_the_environment():
    env = {"NOTIFY_SOCKET": "@x", "PATH": "/bin"}
    assert systemd.Notifier.from_environment(env).address == "@x" and env == {"PATH": "/bin"}
    assert systemd.Notifier.from_environment({}).ready() is False  # not under a service manager

