"""Durability: a client only ever sees 250 for a message that is complete on disk.

Disk full, an unwritable spool and failing flushes must answer 4xx and leave nothing half-written
behind; every durability setting still writes complete files; concurrent sessions share flushes.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import smtplib
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from mailrelay.spool import Envelope, Spool
from mailrelay.spool import committer as committer_module
from mailrelay_sdk.testing import RunningRelay

EMAILRELAY_READY = Path(__file__).resolve().parents[2] / "shared" / "emailrelay-spool" / "ready"
QUEUED_AS = re.compile(r"queued as (\S+)")


def message(n: int, size: int = 0) -> bytes:
    """A message with a numbered subject and (optionally) ``size`` octets of 76-column body."""
    line = b"x" * 74 + b"\r\n"
    body = line * (size // len(line)) if size else b"hello\r\n"
    return f"Subject: message {n}\r\nMessage-ID: <{n}@client.test>\r\n\r\n".encode() + body


def send_one(client: smtplib.SMTP, content: bytes, sender: str = "bob@remote.test",
             recipient: str = "x@far.test") -> tuple[int, str]:
    """MAIL, RCPT, DATA on an open session; return the reply to the end of DATA."""
    code, reply = client.mail(sender)
    assert code == 250, reply
    code, reply = client.rcpt(recipient)
    assert code == 250, reply
    code, reply = client.data(content)
    if code != 250:
        client.rset()
    return code, reply.decode()


def queued_id(reply: str) -> str:
    match = QUEUED_AS.search(reply)
    assert match, reply
    return match.group(1)


def assert_stored_completely(spool: Spool, accepted: dict[str, bytes]) -> None:
    """Exactly the accepted messages are in the spool, each with a full envelope and content,
    and nothing else: no .envelope.new, no content without an envelope."""
    assert spool.ids() == sorted(accepted)
    expected_files = {f"{i}{suffix}" for i in accepted for suffix in (".content", ".envelope")}
    assert set(os.listdir(spool.directory)) == expected_files
    for message_id, body in accepted.items():
        raw = spool.envelope_path(message_id).read_bytes()
        assert raw.endswith(b"X-MailRelay-End: 1\r\n")
        envelope = Envelope.from_bytes(raw)
        assert envelope.sender == "bob@remote.test"
        assert [r.address for r in envelope.recipients] == ["x@far.test"]
        content = spool.read_content(message_id)
        assert content.startswith(b"Received: ")
        assert content.endswith(b"\r\n\r\n" + body.partition(b"\r\n\r\n")[2])
        assert content.split(b"\r\n\r\n", 1)[0].endswith(body.partition(b"\r\n\r\n")[0])


# ---------------------------------------------------------------- disk full
@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 200 KiB tmpfs, unmounted at teardown."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mount_point)], check=True)
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)]).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], check=True)


def test_disk_full_answers_452_and_keeps_every_accepted_message_whole(small_disk: Path):
    accepted: dict[str, bytes] = {}
    refusals: list[tuple[int, str]] = []
    with RunningRelay(small_disk / "spool") as relay:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            client.ehlo("client.test")
            for n in range(60):
                content = message(n, size=24_000)
                code, reply = send_one(client, content)
                if code == 250:
                    assert not refusals, f"250 after the disk was full: {reply}"
                    accepted[queued_id(reply)] = content
                else:
                    refusals.append((code, reply))
                    if len(refusals) == 3:
                        break
            assert accepted, "the first messages fit on the disk"
            assert refusals, "the disk never filled up"
            for code, reply in refusals:
                assert code == 452
                assert reply.startswith("4.3.1")
            assert_stored_completely(relay.spool, accepted)

            # The queue forwards one message and frees its space: the next one is accepted.
            forwarded = min(accepted)
            os.unlink(relay.spool.envelope_path(forwarded))
            os.unlink(relay.spool.content_path(forwarded))
            del accepted[forwarded]
            content = message(100, size=2_000)
            code, reply = send_one(client, content)
            assert code == 250, reply
            accepted[queued_id(reply)] = content
            assert_stored_completely(relay.spool, accepted)


# ---------------------------------------------------------------- unwritable spool
@pytest.fixture
def immutable(tmp_path: Path) -> Iterator[list[Path]]:
    """Directories appended here get ``chattr -i`` at teardown, whatever happened."""
    made: list[Path] = []
    yield made
    for path in made:
        subprocess.run(["chattr", "-i", str(path)], check=False)


def test_an_unwritable_spool_answers_451_until_it_is_writable_again(tmp_path: Path,
                                                                     immutable: list[Path]):
    accepted: dict[str, bytes] = {}
    with RunningRelay(tmp_path / "spool") as relay:
        spool_dir = relay.spool.directory
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            client.ehlo("client.test")
            code, reply = send_one(client, message(1))
            assert code == 250, reply
            accepted[queued_id(reply)] = message(1)

            immutable.append(spool_dir)
            subprocess.run(["chattr", "+i", str(spool_dir)], check=True)
            for n in (2, 3):
                code, reply = send_one(client, message(n))
                assert code == 451, reply
                assert reply.startswith("4.3.0")
            subprocess.run(["chattr", "-i", str(spool_dir)], check=True)

            code, reply = send_one(client, message(4))
            assert code == 250, reply
            accepted[queued_id(reply)] = message(4)
        assert_stored_completely(relay.spool, accepted)


# ---------------------------------------------------------------- failing flushes
def test_a_failing_flush_answers_451_and_leaves_nothing_behind(inprocess_relay, monkeypatch):
    relay = inprocess_relay()

    def broken_flush(paths: list[str]) -> None:
        raise OSError(errno.EIO, "Input/output error")

    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        client.ehlo("client.test")
        monkeypatch.setattr(relay.spool._committer, "_flush", broken_flush)
        code, reply = send_one(client, message(1))
        assert code == 451, reply
        monkeypatch.undo()
        code, reply = send_one(client, message(2))
        assert code == 250, reply
    assert_stored_completely(relay.spool, {queued_id(reply): message(2)})


def test_a_failing_directory_sync_answers_451_and_publishes_nothing(inprocess_relay, monkeypatch):
    # The rename that publishes the message happened but may not survive a crash: the client is
    # told to retry, so the message must not also stay queued (it would be delivered twice).
    relay = inprocess_relay()
    dir_fd = relay.spool._committer._dir_fd
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if fd == dir_fd:
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        client.ehlo("client.test")
        monkeypatch.setattr(os, "fsync", fsync)
        code, reply = send_one(client, message(1))
        assert code == 451, reply
        monkeypatch.undo()
        code, reply = send_one(client, message(2))
        assert code == 250, reply
    assert_stored_completely(relay.spool, {queued_id(reply): message(2)})


# ---------------------------------------------------------------- durability settings
@pytest.fixture
def flush_calls(monkeypatch) -> dict[str, int]:
    """Count the flushes the commit worker makes: fdatasync per file, syncfs, fsync of the dir."""
    calls = {"fdatasync": 0, "syncfs": 0, "fsync": 0}
    real_fdatasync, real_fsync, real_syncfs = os.fdatasync, os.fsync, committer_module._syncfs

    def counting(name, real):
        def call(*args):
            if threading.current_thread().name == "spool-commit":
                calls[name] += 1
            return real(*args)
        return call

    monkeypatch.setattr(os, "fdatasync", counting("fdatasync", real_fdatasync))
    monkeypatch.setattr(os, "fsync", counting("fsync", real_fsync))
    assert real_syncfs is not None, "syncfs(2) is available on Linux"
    monkeypatch.setattr(committer_module, "_syncfs", counting("syncfs", real_syncfs))
    return calls


@pytest.mark.parametrize("spool_config, method, expected", [
    ({"durability": "none"}, "none", {"fdatasync": 0, "syncfs": 0, "fsync": 0}),
    ({"durability": "fsync", "sync_method": "fsync"}, "fsync", {"fdatasync": 6, "syncfs": 0, "fsync": 3}),
    ({"durability": "fsync", "sync_method": "syncfs"}, "syncfs", {"fdatasync": 0, "syncfs": 3, "fsync": 3}),
    ({}, "syncfs", {"fdatasync": 0, "syncfs": 3, "fsync": 3}),
], ids=["none", "fsync", "syncfs", "default"])
def test_every_durability_setting_stores_complete_messages(inprocess_relay, flush_calls, spool_config,
                                                           method, expected):
    relay = inprocess_relay(config={"spool": spool_config})
    assert relay.spool.sync_method == method
    accepted: dict[str, bytes] = {}
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        client.ehlo("client.test")
        for n in range(3):  # one at a time, so each is its own commit
            code, reply = send_one(client, message(n, size=5_000))
            assert code == 250, reply
            accepted[queued_id(reply)] = message(n, size=5_000)
    assert_stored_completely(relay.spool, accepted)
    assert flush_calls == expected


# ---------------------------------------------------------------- group commit
def test_concurrent_sessions_share_commits(inprocess_relay):
    relay = inprocess_relay()
    sessions, per_session = 20, 3
    accepted: dict[str, bytes] = {}
    failures: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(sessions)

    def session(s: int) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", relay.port, timeout=20) as client:
                client.ehlo(f"client{s}.test")
                start.wait(10)
                for n in range(per_session):
                    content = message(s * 100 + n, size=3_000)
                    code, reply = send_one(client, content)
                    with lock:
                        if code == 250:
                            accepted[queued_id(reply)] = content
                        else:
                            failures.append(f"{code} {reply}")
        except Exception as e:  # reported below, in the test thread
            with lock:
                failures.append(repr(e))

    threads = [threading.Thread(target=session, args=(s,)) for s in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert failures == []
    assert len(accepted) == sessions * per_session
    assert_stored_completely(relay.spool, accepted)
    committer = relay.spool._committer
    assert committer.jobs == sessions * per_session
    assert committer.batches < committer.jobs


# ---------------------------------------------------------------- leftovers from a crash
def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_sweep_removes_old_leftovers_and_keeps_everything_else(tmp_path: Path):
    spool = Spool(tmp_path / "spool")
    shutil.copytree(EMAILRELAY_READY, spool.directory)
    d = spool.directory
    for path in d.iterdir():  # ready messages, however old, are never swept
        _age(path, 86_400)
    files = {
        "old-new": ["emailrelay.1.100.1.envelope.new", "emailrelay.1.100.1.content"],
        "old-content-only": ["emailrelay.1.100.2.content"],
        "fresh-new": ["emailrelay.1.200.1.envelope.new", "emailrelay.1.200.1.content"],
        "fresh-content-only": ["emailrelay.1.200.2.content"],
        "old-bad": ["emailrelay.1.100.3.envelope.bad", "emailrelay.1.100.3.content"],
        "old-busy": ["emailrelay.1.100.4.envelope.busy", "emailrelay.1.100.4.content"],
    }
    for kind, names in files.items():
        for name in names:
            (d / name).write_bytes(b"x")
            if kind.startswith("old"):
                _age(d / name, 3_600)
    before = set(os.listdir(d))

    assert spool.sweep_orphans() == 2

    gone = {*files["old-new"], *files["old-content-only"]}
    assert set(os.listdir(d)) == before - gone
    assert spool.ids() == sorted(p.name.removesuffix(".envelope") for p in EMAILRELAY_READY.glob("*.envelope"))
    assert spool.ids("new") == ["emailrelay.1.200.1"]
    assert spool.sweep_orphans() == 0


def test_relay_start_up_sweeps_what_a_crash_left_behind(tmp_path: Path):
    spool_dir = tmp_path / "spool"
    shutil.copytree(EMAILRELAY_READY, spool_dir)
    leftovers = [spool_dir / "emailrelay.1.100.1.envelope.new", spool_dir / "emailrelay.1.100.1.content",
                 spool_dir / "emailrelay.1.100.2.content"]
    for path in leftovers:
        path.write_bytes(b"half a message")
        _age(path, 3_600)
    fresh = spool_dir / "emailrelay.1.200.1.content"
    fresh.write_bytes(b"another process is writing this")
    with RunningRelay(spool_dir) as relay:
        assert not any(path.exists() for path in leftovers)
        assert fresh.exists()
        assert len(relay.spool.ids()) == 4
