"""Durability: a client only ever sees 250 for a message that is complete on disk.

Disk full, an unwritable spool and failing flushes must answer 4xx and leave nothing half-written
behind; every durability setting still writes complete files; concurrent sessions share flushes.
"""

from __future__ import annotations

import asyncio
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

from mailrelay.spool import Envelope, Spool, commit_marker
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


def assert_stored_completely(spool: Spool, accepted: dict[str, bytes], *, marked: bool = True) -> None:
    """Exactly the accepted messages are in the spool, each with a full envelope and content,
    and nothing else: no .envelope.new, no content without an envelope. ``marked``: each
    envelope ends with a commit marker that matches it and its content."""
    assert spool.ids() == sorted(accepted)
    expected_files = {f"{i}{suffix}" for i in accepted for suffix in (".content", ".envelope")}
    assert set(os.listdir(spool.directory)) == expected_files
    for message_id, body in accepted.items():
        raw = spool.envelope_path(message_id).read_bytes()
        marker = commit_marker.read_marker(raw)
        if marked:
            assert marker is not None and marker.to == "ready", raw
            assert commit_marker.content_matches(marker, spool.content_path(message_id))
        else:
            assert marker is None, raw
        # E-MailRelay reads up to the End line and keeps whatever follows it.
        assert commit_marker.unmarked(raw).endswith(b"X-MailRelay-End: 1\r\n")
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


def failing_directory_fsync(relay, monkeypatch) -> None:
    dir_fd = relay.spool._committer._dir_fd
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if fd == dir_fd:
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_a_failing_directory_sync_before_the_answer_answers_451_and_publishes_nothing(inprocess_relay,
                                                                                     monkeypatch):
    # Flushing file by file, the directory's fsync makes the new files' names durable: without
    # it the message may not survive a crash, so the client is told to retry, and the message
    # must not also stay queued (it would be delivered twice).
    relay = inprocess_relay(config={"spool": {"sync_method": "fsync"}})
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        client.ehlo("client.test")
        failing_directory_fsync(relay, monkeypatch)
        code, reply = send_one(client, message(1))
        assert code == 451, reply
        monkeypatch.undo()
        code, reply = send_one(client, message(2))
        assert code == 250, reply
    assert_stored_completely(relay.spool, {queued_id(reply): message(2)})


def test_a_failing_directory_sync_after_the_answer_keeps_the_message(inprocess_relay, monkeypatch, caplog):
    # The sync that persists renames of answered messages comes after the flush that made them
    # durable: the message stays queued (a lost rename is what the commit marker repairs).
    relay = inprocess_relay()
    committer = relay.spool._committer
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        client.ehlo("client.test")
        failing_directory_fsync(relay, monkeypatch)
        syncs = committer.directory_syncs
        code, reply = send_one(client, message(1))
        assert code == 250, reply
        wait_for(lambda: committer.directory_syncs > syncs)
        monkeypatch.undo()
    assert_stored_completely(relay.spool, {queued_id(reply): message(1)})
    assert "could not sync the directory after publishing" in caplog.text


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# ---------------------------------------------------------------- durability settings
@pytest.fixture
def commit_steps(monkeypatch) -> list[str]:
    """What the commit worker does, in order: fdatasync (per file), syncfs, fsync (of the
    directory) and answer (the futures resolved, so the client gets its reply)."""
    steps: list[str] = []
    real_fdatasync, real_fsync, real_syncfs = os.fdatasync, os.fsync, committer_module._syncfs
    real_complete = committer_module.GroupCommitter._complete

    def counting(name, real):
        def call(*args):
            if threading.current_thread().name == "spool-commit":
                steps.append(name)
            return real(*args)
        return call

    def complete(batch, errors):
        steps.append("answer")
        return real_complete(batch, errors)

    monkeypatch.setattr(os, "fdatasync", counting("fdatasync", real_fdatasync))
    monkeypatch.setattr(os, "fsync", counting("fsync", real_fsync))
    assert real_syncfs is not None, "syncfs(2) is available on Linux"
    monkeypatch.setattr(committer_module, "_syncfs", counting("syncfs", real_syncfs))
    monkeypatch.setattr(committer_module.GroupCommitter, "_complete", staticmethod(complete))
    return steps


@pytest.mark.parametrize("spool_config, method, per_message", [
    ({"durability": "none"}, "none", ["answer"]),
    # data and names (fdatasync of content and envelope, fsync of the directory), answer, and
    # with the queue empty, one more fsync for the rename
    ({"durability": "fsync", "sync_method": "fsync"}, "fsync",
     ["fdatasync", "fdatasync", "fsync", "answer", "fsync"]),
    ({"durability": "fsync", "sync_method": "syncfs"}, "syncfs", ["syncfs", "answer", "fsync"]),
    ({}, "syncfs", ["syncfs", "answer", "fsync"]),
], ids=["none", "fsync", "syncfs", "default"])
def test_every_durability_setting_stores_complete_messages_with_one_flush_before_the_answer(
        inprocess_relay, commit_steps, spool_config, method, per_message):
    relay = inprocess_relay(config={"spool": spool_config})
    assert relay.spool.sync_method == method
    accepted: dict[str, bytes] = {}
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        client.ehlo("client.test")
        for n in range(3):  # one at a time, so each is its own commit
            code, reply = send_one(client, message(n, size=5_000))
            assert code == 250, reply
            accepted[queued_id(reply)] = message(n, size=5_000)
            wait_for(lambda: len(commit_steps) >= len(per_message) * (n + 1))
    assert_stored_completely(relay.spool, accepted, marked=method != "none")
    assert commit_steps == per_message * 3


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


# ---------------------------------------------------------------- a rename lost in a system crash
def _before_boot(path: Path) -> None:
    """Date ``path`` before the running system started, as after a crash and a reboot."""
    from mailrelay.spool.store import system_boot_time

    booted = system_boot_time()
    assert booted is not None, "/proc/stat has btime on Linux"
    then = min(booted - 60, time.time() - 3_600)  # and old enough for the sweep on a fresh machine
    os.utime(path, (then, then))


def _unpublish(spool: Spool, message_id: str, copy_as: str | None = None) -> str:
    """Turn a published message back into its committed ``.envelope.new`` (what a system crash
    leaves when the rename after the flush is lost), optionally as a copy under another id."""
    target = copy_as or message_id
    envelope = spool.envelope_path(message_id).read_bytes()
    content = spool.content_path(message_id).read_bytes()
    if copy_as is None:
        spool.envelope_path(message_id).unlink()
    spool.envelope_path(target, "new").write_bytes(envelope)
    spool.content_path(target).write_bytes(content)
    return target


def test_a_committed_message_whose_rename_a_system_crash_lost_is_published_at_start_up(tmp_path: Path):
    spool_dir = tmp_path / "spool"
    with RunningRelay(spool_dir) as relay:
        accepted: dict[str, bytes] = {}
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            client.ehlo("client.test")
            for n in range(2):
                code, reply = send_one(client, message(n, size=3_000))
                assert code == 250, reply
                accepted[queued_id(reply)] = message(n, size=3_000)
        spool = relay.spool
    lost, kept = sorted(accepted)
    _unpublish(spool, lost)
    # Written but flushed only in part when the system went down: never acknowledged.
    torn = _unpublish(spool, kept, copy_as="emailrelay.1.100.7")
    with open(spool.content_path(torn), "r+b") as f:
        f.truncate(1000)
    # Written for the server filters, never committed: no marker.
    unfiltered = "emailrelay.1.100.8"
    spool.envelope_path(unfiltered, "new").write_bytes(commit_marker.unmarked(spool.envelope_path(kept).read_bytes()))
    spool.content_path(unfiltered).write_bytes(spool.content_path(kept).read_bytes())
    for path in spool_dir.iterdir():
        _before_boot(path)

    with RunningRelay(spool_dir) as relay:
        # The torn one is set aside, not deleted (and not forwarded): the marker says it was
        # committed, the content says the commit never finished.
        bad = relay.spool.envelope_path(torn, "bad")
        assert "content incomplete after a crash (1000 of" in Envelope.from_bytes(bad.read_bytes()).reason
        bad.unlink()
        relay.spool.content_path(torn).unlink()
        assert_stored_completely(relay.spool, accepted)


def test_recovery_publishes_a_committed_quarantine_as_bad_and_old_committed_leftovers(tmp_path: Path):
    spool = Spool(tmp_path / "spool")
    spool.open()
    try:
        envelope = Envelope("a@b.test", ()).to_bytes()
        content = b"Subject: spam\r\n\r\nbuy\r\n"
        bad = "emailrelay.1.100.1"
        spool.content_path(bad).write_bytes(content)
        spool.envelope_path(bad, "new").write_bytes(
            commit_marker.marked(envelope, commit_marker.checksum([content]), "bad"))
        _before_boot(spool.envelope_path(bad, "new"))
        # Committed since this boot: a live process sharing the spool may be about to rename it,
        # so it is left alone while young; once old it is published (a killed process's message,
        # or a rename lost on a host that took over the disk: a duplicate at worst, never a loss).
        later = "emailrelay.1.100.2"
        spool.content_path(later).write_bytes(content)
        spool.envelope_path(later, "new").write_bytes(
            commit_marker.marked(envelope, commit_marker.checksum([content]), "ready"))

        assert spool.sweep_orphans() == 0
        assert spool.ids("bad") == [bad]
        assert Envelope.from_bytes(spool.envelope_path(bad, "bad").read_bytes()).sender == "a@b.test"
        assert spool.ids("new") == [later]
        _age(spool.envelope_path(later, "new"), 3_600)
        assert spool.sweep_orphans() == 0
        assert spool.ids() == [later]
        assert sorted(os.listdir(spool.directory)) == sorted(
            [f"{bad}.content", f"{bad}.envelope.bad", f"{later}.content", f"{later}.envelope"])
    finally:
        spool.close()


def test_the_commit_marker_stays_out_of_the_envelope_fields():
    envelope = Envelope("a@b.test", ())
    raw = commit_marker.marked(envelope.to_bytes(), commit_marker.checksum([b"x"]), "ready")
    assert Envelope.from_bytes(raw) == envelope
    assert Envelope.from_bytes(raw).to_bytes() == envelope.to_bytes()
    # One flipped byte anywhere before the marker, and it no longer vouches for the envelope.
    assert commit_marker.read_marker(raw) is not None
    assert commit_marker.read_marker(raw.replace(b"a@b.test", b"a@c.test")) is None
    assert commit_marker.read_marker(raw[:-3]) is None


def test_a_commit_after_server_filters_seals_an_envelope_they_rewrote_with_bare_line_feeds(tmp_path: Path):
    # E-MailRelay's filter contract lets a filter edit the envelope file; one written with LF
    # line ends and no final line end still gets a readable marker (and an intact End line).
    spool = Spool(tmp_path / "spool")
    spool.open()
    try:
        message_id = spool.new_id()
        content = b"Subject: filtered\r\n\r\nbody\r\n"
        pending = asyncio.run(_write_then_commit(spool, message_id, content))
        raw = spool.envelope_path(message_id).read_bytes()
        assert b"\r\nX-MailRelay-End: 1\r\nX-MailRelay-Committed: " in raw
        assert b"\n" not in raw.replace(b"\r\n", b"")
        assert Envelope.from_bytes(raw).forward_to == "127.0.0.1:2525"
        # the rename lost in a system crash: start-up finds the committed .new and publishes it
        os.rename(spool.envelope_path(message_id), pending.envelope_path)
        for path in (pending.envelope_path, pending.content_path):
            _before_boot(path)
        assert spool.ids() == []
        spool.sweep_orphans()
        assert spool.ids() == [message_id]
    finally:
        spool.close()


async def _write_then_commit(spool: Spool, message_id: str, content: bytes):
    pending = await spool.write(message_id, Envelope("a@b.test", ()), [content], commit=False)
    edited = pending.envelope_path.read_bytes().replace(
        b"X-MailRelay-End: 1\r\n", b"X-MailRelay-ForwardTo: 127.0.0.1:2525\r\nX-MailRelay-End: 1")
    pending.envelope_path.write_bytes(edited.replace(b"\r\n", b"\n"))
    await spool.commit(pending)
    return pending


# ---------------------------------------------------------------- when renames are synced
def _commit_once(spool: Spool, n: int) -> str:
    message_id = spool.new_id()
    asyncio.run(spool.write(message_id, Envelope("a@b.test", ()), [message(n)], commit=True))
    return message_id


def test_the_next_batch_carries_the_renames_of_the_last_and_stopping_syncs_what_is_left(tmp_path: Path,
                                                                                       commit_steps):
    spool = Spool(tmp_path / "spool")
    spool.open()
    committer = spool._committer
    committer.rename_sync_delay = 3600.0  # no sync of its own during the test
    try:
        _commit_once(spool, 1)
        _commit_once(spool, 2)
        # The second batch's syncfs made the first one's rename durable: no fsync between them.
        assert commit_steps == ["syncfs", "answer", "syncfs", "answer"]
        assert committer.directory_syncs == 0
    finally:
        spool.close()
    assert commit_steps == ["syncfs", "answer", "syncfs", "answer", "fsync"]  # the last rename, at stop
    assert committer.directory_syncs == 1


def test_renames_are_synced_while_only_removals_keep_the_commit_thread_busy(tmp_path: Path):
    spool = Spool(tmp_path / "spool")
    spool.open()
    committer = spool._committer
    committer.rename_sync_delay = 0.2
    try:
        committed = time.monotonic()
        _commit_once(spool, 1)
        n = 0
        while committer.directory_syncs == 0:  # delivered messages' removals, about 100 a second
            assert time.monotonic() < committed + 10, "the rename was never synced"
            victim = spool.directory / f"gone.{n}"
            victim.write_bytes(b"x")
            spool.discard([victim])
            n += 1
            time.sleep(0.01)
        assert time.monotonic() - committed >= 0.2  # after the delay, not at the first idle moment
    finally:
        spool.close()
