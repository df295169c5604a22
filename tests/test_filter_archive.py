"""archive: through a real relay, and `relay archive verify` catching every kind of tampering."""

from __future__ import annotations

import hashlib
import json
import os
import smtplib
import stat
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailrelay_plugins.filters.archive import (INDEX, ZERO_HASH, append_entry, archive_cli, archive_message,
                                               verify_archive)

BODY = b"Subject: keep me\r\n\r\nfor the auditors\r\n"


def send(port: int, sender: str, recipients: list[str], body: bytes = BODY) -> int:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo()
        client.mail(sender)
        for rcpt in recipients:
            assert client.rcpt(rcpt)[0] == 250
        return client.data(body)[0]


def index_lines(directory: Path) -> list[bytes]:
    return (directory / INDEX).read_bytes().splitlines()


def verify(directory: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(archive_cli, ["verify", str(directory), *args])
    return result.exit_code, result.output


def relay_verify(directory: Path, *args: str) -> subprocess.CompletedProcess:
    """The real `relay` executable, as an auditor would run it."""
    relay = Path(sys.executable).with_name("relay")
    return subprocess.run([str(relay), "archive", "verify", str(directory), *args], capture_output=True,
                          text=True, timeout=60)


@pytest.fixture
def archived(relay_process) -> Path:
    """A relay archiving every message at the server stage, after three messages."""
    relay = relay_process("--filter", "archive:")
    for n in range(3):
        assert send(relay.port, f"s{n}@example.test", [f"r{n}@far.test", "all@far.test"]) == 250
    return relay.spool / "archive"


def test_every_accepted_message_is_archived_read_only_with_a_chained_index(archived):
    lines = [json.loads(line) for line in index_lines(archived)]
    assert [entry["sender"] for entry in lines] == ["s0@example.test", "s1@example.test", "s2@example.test"]
    assert lines[1]["recipients"] == ["r1@far.test", "all@far.test"]
    assert lines[0]["prev"] == ZERO_HASH
    raw = index_lines(archived)
    assert lines[2]["prev"] == hashlib.sha256(raw[1]).hexdigest()
    for entry in lines:
        stored = archived / f"{entry['sha256']}.eml"
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == entry["sha256"]
        assert stored.read_bytes().endswith(BODY) and entry["id"].encode() in stored.read_bytes()
        assert stat.S_IMODE(stored.stat().st_mode) == 0o444
    code, output = verify(archived)
    assert code == 0, output
    assert "intact: 3 message(s), 3 stored file(s)" in output


def test_a_modified_message_file_fails_verification(archived):
    entry = json.loads(index_lines(archived)[1])
    stored = archived / f"{entry['sha256']}.eml"
    stored.chmod(0o644)
    stored.write_bytes(stored.read_bytes().replace(b"auditors", b"nobody!!"))
    code, output = verify(archived)
    assert code == 1
    assert "line 2" in output and f"{stored.name} was modified" in output


def test_an_edited_index_line_fails_verification_at_the_next_line(archived):
    lines = index_lines(archived)
    lines[0] = lines[0].replace(b"s0@example.test", b"zz@example.test")
    (archived / INDEX).write_bytes(b"\n".join(lines) + b"\n")
    code, output = verify(archived)
    assert code == 1
    assert "index.jsonl line 2: prev is wrong" in output and "line 1 was edited" in output


@pytest.mark.parametrize("damage", ["remove", "swap", "delete-file"])
def test_removed_reordered_lines_and_missing_files_fail_verification(archived, damage):
    lines = index_lines(archived)
    if damage == "remove":
        del lines[1]
    elif damage == "swap":
        lines[1], lines[2] = lines[2], lines[1]
    else:
        (archived / f"{json.loads(lines[2])['sha256']}.eml").unlink()
    (archived / INDEX).write_bytes(b"\n".join(lines) + b"\n")
    code, output = verify(archived)
    assert code == 1, output
    assert ("missing" if damage == "delete-file" else "prev is wrong") in output


def test_a_recorded_head_detects_a_truncated_index(archived):
    head = hashlib.sha256(index_lines(archived)[-1]).hexdigest()
    assert verify(archived, "--head", head)[0] == 0
    (archived / INDEX).write_bytes(b"\n".join(index_lines(archived)[:-1]) + b"\n")
    assert verify(archived)[0] == 0  # the chain alone cannot tell
    code, output = verify(archived, "--head", head)
    assert code == 1 and "recorded hash" in output


def test_the_relay_executable_runs_archive_verify(archived):
    result = relay_verify(archived)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "intact: 3 message(s)" in result.stdout
    (archived / INDEX).write_bytes(index_lines(archived)[1] + b"\n")
    result = relay_verify(archived)
    assert result.returncode == 1 and "line 1: prev is wrong" in result.stdout


def test_verify_of_a_directory_that_is_no_archive_says_so(tmp_path):
    code, output = verify(tmp_path)
    assert code == 1 and "not an archive directory" in output


def test_copy_does_not_copy_into_the_archive(tmp_path, relay_process):
    spool = tmp_path / "spool"
    (spool / "alice").mkdir(parents=True)
    relay = relay_process("--filter", "archive:,copy:", spool=spool)
    assert send(relay.port, "s@example.test", ["r@far.test"]) == 250
    assert len(list((spool / "alice").glob("*.content"))) == 1
    assert not list((spool / "archive").glob("*.content"))  # copy: skipped the archive
    assert verify(spool / "archive")[0] == 0


def test_same_content_twice_is_one_file_and_two_lines(tmp_path):
    for n in range(2):
        archive_message(tmp_path, b"same", {"time": "t", "id": f"m{n}", "sender": "s", "recipients": []})
    assert len(list(tmp_path.glob("*.eml"))) == 1 and len(index_lines(tmp_path)) == 2
    assert verify_archive(tmp_path).intact


entries = st.fixed_dictionaries({
    "time": st.text(max_size=30), "id": st.text(max_size=40), "sender": st.text(max_size=60),
    "recipients": st.lists(st.text(max_size=60), max_size=5)})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(entries, st.binary(max_size=200), st.binary(min_size=1, max_size=30)), min_size=1,
                max_size=12), st.sets(st.integers(0, 11)))
def test_the_chain_survives_any_sequence_of_appends_and_interrupted_writes(tmp_path_factory, appends, torn):
    directory = tmp_path_factory.mktemp("archive")
    for n, (entry, content, partial) in enumerate(appends):
        archive_message(directory, content, entry, durable=False)
        if n in torn:  # a crash in the middle of the next append
            with open(directory / INDEX, "ab") as f:
                f.write(partial.replace(b"\n", b" "))
    result = verify_archive(directory)
    assert result.intact, result.problem
    assert result.lines == len(appends)
    assert result.files == len({content for _, content, _ in appends})


def _append_many(args: tuple[str, int, int]) -> None:
    directory, worker, count = args
    for n in range(count):
        append_entry(Path(directory), {"time": "t", "id": f"w{worker}-{n}", "sender": "s", "recipients": [],
                                       "sha256": ZERO_HASH}, durable=False)


def test_concurrent_archivers_in_several_processes_keep_one_chain(tmp_path):
    os.close(os.open(tmp_path / INDEX, os.O_CREAT | os.O_WRONLY, 0o640))
    with ProcessPoolExecutor(4) as pool:
        list(pool.map(_append_many, [(str(tmp_path), w, 50) for w in range(4)]))
    lines = index_lines(tmp_path)
    assert len(lines) == 200 and len({json.loads(line)["id"] for line in lines}) == 200
    prev = ZERO_HASH
    for line in lines:
        assert json.loads(line)["prev"] == prev
        prev = hashlib.sha256(line).hexdigest()
