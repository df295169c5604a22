"""--user (-u): started as root, the relay binds its sockets and opens the spool, then becomes that
user for good (groups, gid, uid), so mail is spooled and filters run as that user.

The test suite runs as root; the spools here are fresh directories under /tmp (pytest's own are
under a root-only directory that the user could not enter).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import free_port, submit, wait_for_port, wait_until

MSG = b"From: a@example.test\r\nTo: b@example.test\r\nSubject: as nobody\r\n\r\nhello\r\n"


@pytest.fixture
def nobody() -> pwd.struct_passwd:
    assert os.geteuid() == 0, "these tests start the relay as root"
    return pwd.getpwnam("nobody")


@pytest.fixture
def shared_dir():
    """A directory under /tmp (any user may search /tmp), removed at teardown."""
    path = Path(tempfile.mkdtemp(prefix="mailrelay-user-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def ids(pid: int) -> dict[str, list[int]]:
    """Uid, Gid (real, effective, saved, filesystem) and Groups of a process."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups"):
            fields[key] = [int(v) for v in value.split()]
    return fields


def listener_owner(port: int) -> int:
    """The uid that created the socket listening on 127.0.0.1:``port`` (from /proc/net/tcp)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        columns = line.split()
        local, state, uid = columns[1], columns[3], int(columns[7])
        if state == "0A" and int(local.split(":")[1], 16) == port:
            return uid
    raise AssertionError(f"nothing listens on port {port}")


def test_the_relay_runs_as_the_user_and_spools_as_it(relay_process, nobody, shared_dir):
    spool = shared_dir / "spool"
    spool.mkdir()
    os.chown(spool, nobody.pw_uid, nobody.pw_gid)
    filter_script = shared_dir / "whoami"
    filter_script.write_text(f"#!/bin/sh\nid -u > {shared_dir}/filter-uid/uid\nexit 0\n")
    filter_script.chmod(0o755)
    (shared_dir / "filter-uid").mkdir()
    os.chown(shared_dir / "filter-uid", nobody.pw_uid, nobody.pw_gid)
    os.chmod(shared_dir, 0o755)

    running = relay_process("--user", "nobody", "--filter", str(filter_script), spool=spool)
    wait_until(lambda: "running as user nobody" in running.log, what="the switch")
    status = ids(running.proc.pid)
    assert status["Uid"] == [nobody.pw_uid] * 4 and status["Gid"] == [nobody.pw_gid] * 4
    assert status["Groups"] == [nobody.pw_gid]  # root's supplementary groups are gone
    assert listener_owner(running.port) == 0    # bound while still root: a low port would work too

    assert submit(running.port, MSG) == (250, "")
    [content] = spool.glob("*.content")
    assert content.stat().st_uid == nobody.pw_uid and b"as nobody" in content.read_bytes()
    assert (shared_dir / "filter-uid" / "uid").read_text().strip() == str(nobody.pw_uid)


def test_the_detached_daemon_switches_after_writing_its_pid_file(nobody, shared_dir, tmp_path):
    spool = shared_dir / "spool"  # created by the relay, for the user
    os.chmod(shared_dir, 0o755)
    pid_file, port, log = tmp_path / "relay.pid", free_port(), tmp_path / "relay.log"
    with open(log, "wb") as output:  # the daemon keeps stderr: a file, not a pipe to wait on
        started = subprocess.run([sys.executable, "-m", "mailrelay", "-u", "nobody", "--log", "--no-syslog",
                                  "--port", str(port), "--spool-dir", str(spool), "--pid-file", str(pid_file)],
                                 stdout=output, stderr=subprocess.STDOUT, timeout=60)
    assert started.returncode == 0, log.read_text()
    pid = int(pid_file.read_text())
    try:
        wait_for_port(port)
        assert ids(pid)["Uid"] == [nobody.pw_uid] * 4
        assert spool.stat().st_uid == nobody.pw_uid
        assert submit(port, MSG) == (250, "")
        assert [p.stat().st_uid for p in spool.glob("*.envelope")] == [nobody.pw_uid]
    finally:
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2],
                   what="the daemon to stop")


def run_relay(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mailrelay", "--no-daemon", "--log", "--no-syslog",
                           "--port", str(free_port()), *args], capture_output=True, text=True, timeout=60)


def test_a_spool_the_user_cannot_write_is_a_clear_error(nobody, shared_dir):
    spool = shared_dir / "spool"
    spool.mkdir(mode=0o755)  # root's
    os.chmod(shared_dir, 0o755)
    result = run_relay("--user", "nobody", "--spool-dir", str(spool))
    assert result.returncode == 1
    assert f"relay: error: spool directory {spool} is not writable by user nobody (--user): chown nobody {spool}" \
        in result.stderr


def test_a_spool_the_user_cannot_reach_is_a_clear_error(nobody, tmp_path):
    spool = tmp_path / "spool"  # under pytest's root-only directory
    spool.mkdir()
    os.chown(spool, nobody.pw_uid, nobody.pw_gid)
    result = run_relay("--user", "nobody", "--spool-dir", str(spool))
    assert result.returncode == 1 and "is not writable by user nobody" in result.stderr


def test_an_unknown_user_is_an_error(shared_dir):
    result = run_relay("-u", "no-such-user-here", "--spool-dir", str(shared_dir))
    assert result.returncode == 1 and "relay: error: --user no-such-user-here: no such user" in result.stderr


def test_user_root_switches_nothing(relay_process, shared_dir):
    running = relay_process("--user", "root", spool=shared_dir / "spool")
    assert submit(running.port, MSG) == (250, "")
    time.sleep(0.1)
    assert ids(running.proc.pid)["Uid"] == [0, 0, 0, 0]
    assert "running as user" not in running.log
