"""The commit thread's GIL-keeping writes (mailrelay.spool.held_syscalls) and when it uses them.

They must write exactly what the os calls write, fail the same way, and stay off where a call
could take long: a network file system, a large batch, or storage that has just been slow.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
from pathlib import Path

import pytest

from mailrelay.spool import Envelope, Spool
from mailrelay.spool import committer as committer_module
from mailrelay.spool.held_syscalls import HeldSyscalls, local_file_system

MOUNTINFO = """\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
30 22 0:26 / /tmp rw,nosuid shared:2 - tmpfs tmpfs rw
41 22 0:40 / /var/spool/mail\\040relay rw,relatime shared:9 - nfs4 server:/export rw,vers=4.2
42 41 0:41 / /var/spool/mail\\040relay/local rw shared:10 - xfs /dev/vdb rw
43 22 0:42 / /srv/fuse rw shared:11 - fuse.sshfs host:/x rw
"""


@pytest.fixture
def held() -> HeldSyscalls:
    calls = HeldSyscalls.load()
    assert calls is not None, "the C library loads through ctypes on Linux"
    return calls


def write(path: Path, parts: list[bytes], calls, *, replace: bool = False) -> None:
    committer_module._write_file(committer_module.FileWrite(str(path), parts, replace=replace), calls)


def test_held_writes_create_the_same_file_the_os_calls_do(tmp_path: Path, held: HeldSyscalls):
    parts = [b"Received: from a\r\n", b"", b"Subject: x\r\n\r\n" + b"\xe2\x82\xac body\r\n" * 500]
    write(tmp_path / "held", parts, held)
    write(tmp_path / "os", parts, os)
    assert (tmp_path / "held").read_bytes() == (tmp_path / "os").read_bytes() == b"".join(parts)
    modes = {stat.S_IMODE((tmp_path / name).stat().st_mode) for name in ("held", "os")}
    umask = os.umask(0)
    os.umask(umask)
    assert modes == {committer_module.FILE_MODE & ~umask}


def test_held_writes_fail_like_os_calls_with_the_errno_and_path(tmp_path: Path, held: HeldSyscalls):
    target = tmp_path / "exists"
    target.write_bytes(b"old")
    with pytest.raises(OSError) as excinfo:
        write(target, [b"new"], held)
    assert excinfo.value.errno == errno.EEXIST
    assert excinfo.value.filename == str(target)
    assert target.read_bytes() == b"old"  # exclusive creation never touches an existing file

    write(target, [b"replaced"], held, replace=True)
    assert target.read_bytes() == b"replaced"

    with pytest.raises(FileNotFoundError):
        write(tmp_path / "no-such-dir" / "f", [b"x"], held)
    with pytest.raises(FileNotFoundError):
        held.rename(str(tmp_path / "missing"), str(tmp_path / "elsewhere"))
    held.rename(str(target), str(tmp_path / "moved"))
    assert (tmp_path / "moved").read_bytes() == b"replaced" and not target.exists()


def test_a_network_or_fuse_file_system_is_not_local():
    assert local_file_system("/var/spool/mailrelay", MOUNTINFO)          # under / (ext4)
    assert local_file_system("/tmp/spool", MOUNTINFO)                     # tmpfs
    assert not local_file_system("/var/spool/mail relay/q", MOUNTINFO)    # NFS (escaped space)
    assert local_file_system("/var/spool/mail relay/local/q", MOUNTINFO)  # xfs mounted inside it
    assert not local_file_system("/srv/fuse/spool", MOUNTINFO)            # FUSE
    assert not local_file_system("/anything", "")                         # nothing known: not local
    assert local_file_system(os.getcwd())  # this machine's real mount table


def commit(spool: Spool, size: int) -> str:
    message_id = spool.new_id()
    asyncio.run(spool.write(message_id, Envelope("a@b.test", ()), [b"Subject: x\r\n\r\n" + b"y" * size],
                            commit=True))
    return message_id


def stored(spool: Spool, message_id: str) -> tuple[bytes, bytes]:
    return spool.read_content(message_id), spool.envelope_path(message_id).read_bytes()


def test_small_batches_are_written_with_held_calls_and_store_what_os_calls_store(tmp_path: Path):
    spools = {}
    for name, held in (("held", True), ("os", False)):
        spool = Spool(tmp_path / name)
        spool._committer = committer_module.GroupCommitter(str(spool.directory), held_syscalls=held)
        spool.open()
        try:
            message_id = commit(spool, 4000)
            spools[name] = (spool, message_id)
            assert spool._committer.held_batches == (1 if held else 0)
        finally:
            spool.close()
    (held_spool, held_id), (os_spool, os_id) = spools["held"], spools["os"]
    held_content, held_envelope = stored(held_spool, held_id)
    os_content, os_envelope = stored(os_spool, os_id)
    assert held_content == os_content
    assert held_envelope == os_envelope  # marker included: same size and checksums


def test_large_batches_and_slow_storage_let_the_event_loop_run(tmp_path: Path, monkeypatch, caplog):
    spool = Spool(tmp_path / "spool")
    spool.open()
    committer = spool._committer
    try:
        commit(spool, committer_module.HELD_BATCH_BYTES + 1)  # a large message: os calls
        assert committer.held_batches == 0
        assert commit(spool, 100)
        assert committer.held_batches == 1

        # Storage got slow: one held batch over the limit, and the next ones use os calls.
        monkeypatch.setattr(committer_module, "HELD_SLOW", 0.0)
        with caplog.at_level(logging.WARNING, logger="mailrelay.spool"):
            commit(spool, 100)
        assert committer.held_batches == 2
        assert "spool writes let the event loop run" in caplog.text
        monkeypatch.undo()
        message_id = commit(spool, 100)
        assert committer.held_batches == 2
        assert stored(spool, message_id)[0].endswith(b"y" * 100)
    finally:
        spool.close()
