"""``so:`` compiled filters: the C examples built with the system compiler, run by a real relay."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from conftest import ROOT, free_port, require, spooled_contents, submit, wait_until
from mailrelay_plugins.filters.so_worker import ffi
from sinks import Sink

FILTERS_C = ROOT / "filters_c"
MSG = b"From: a@example.test\r\nTo: b@example.test\r\nSubject: so filter test\r\n\r\nhello\r\n"


@pytest.fixture(scope="module")
def libs(tmp_path_factory) -> Path:
    """The example filters and the ABI test variants, built by filters_c/Makefile."""
    require("cc")
    make = require("make")
    out = tmp_path_factory.mktemp("so")
    build = subprocess.run([make, "-C", str(FILTERS_C), f"OUT={out}", "EXTRA_CFLAGS=-Werror", "testlibs"],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stdout + build.stderr
    return out


def send(port: int, content: bytes = MSG, *, timeout: float = 30) -> tuple[int, str]:
    return submit(port, content, recipients=["b@example.test"], timeout=timeout)


def spooled(relay) -> list[bytes]:
    return spooled_contents(relay.spool)


def worker_stamp(content: bytes) -> tuple[int, int]:
    """(pid, calls) from misbehave's X-Misbehave-Worker header."""
    match = re.match(rb"X-Misbehave-Worker: pid=(\d+) calls=(\d+)\r\n", content)
    assert match, content[:200]
    return int(match.group(1)), int(match.group(2))


def test_the_python_binding_matches_the_header_layout(libs, tmp_path):
    """cffi's declarations and mailrelay_filter.h agree on every struct offset a filter uses."""
    fields = {"mailrelay_message": ["spool_id", "stage", "sender", "recipients", "recipient_count", "client_ip",
                                    "helo", "auth_user", "message_id", "content_path", "envelope_path", "content",
                                    "content_size"],
              "mailrelay_verdict": ["exit_code", "smtp_code", "text", "reason", "content", "content_size"]}
    lines = [f'printf("{s} %zu\\n", sizeof(struct {s}));' for s in fields]
    lines += [f'printf("{s}.{f} %zu\\n", offsetof(struct {s}, {f}));' for s, names in fields.items() for f in names]
    source = tmp_path / "layout.c"
    source.write_text('#include <stdio.h>\n#include "mailrelay_filter.h"\nint main(void) {\n'
                      + "\n".join(lines) + '\nprintf("abi %d\\n", MAILRELAY_FILTER_ABI_VERSION);\nreturn 0;\n}\n')
    subprocess.run([require("cc"), "-I", str(FILTERS_C), "-o", str(tmp_path / "layout"), str(source)], check=True)
    printed = dict(line.split() for line in subprocess.run([str(tmp_path / "layout")], capture_output=True,
                                                           text=True, check=True).stdout.splitlines())
    expected = {s: str(ffi.sizeof(f"struct {s}")) for s in fields}
    expected |= {f"{s}.{f}": str(ffi.offsetof(f"struct {s}", f)) for s, names in fields.items() for f in names}
    expected["abi"] = "1"
    assert printed == expected


def test_stamper_adds_its_header_to_the_spooled_message(libs, relay_process):
    relay = relay_process("--filter", f"so:{libs}/libstamp.so;X-Checked-By: relay-test")
    assert send(relay.port) == (250, "")
    [content] = spooled(relay)
    assert content.startswith(b"X-Checked-By: relay-test\r\n")
    assert content.endswith(MSG)
    assert relay.proc.poll() is None


def test_stamper_at_the_client_stage_edits_what_is_forwarded(libs, relay_process):
    sink = Sink(free_port()).start()
    try:
        relay = relay_process("--forward-to", f"127.0.0.1:{sink.port}",
                              "--client-filter", f"so:{libs}/libstamp.so;X-Stage: client")
        assert send(relay.port) == (250, "")
        [got] = sink.wait_for(1)
        assert got.content.startswith(b"X-Stage: client\r\n") and got.content.endswith(MSG)
        wait_until(lambda: not list(relay.spool.glob("*.content")), what="an empty spool")
    finally:
        sink.stop()



def test_a_crash_at_the_client_stage_keeps_the_message_for_a_retry(libs, relay_process):
    sink = Sink(free_port()).start()
    try:
        relay = relay_process("--forward-to", f"127.0.0.1:{sink.port}",
                              "--client-filter", f"so:{libs}/libmisbehave.so")
        assert send(relay.port, b"X-Misbehave: crash\r\n" + MSG) == (250, "")  # the crash comes later
        wait_until(lambda: "killed by signal SIGSEGV" in relay.log, what="the worker crash in the log")
        assert send(relay.port) == (250, "")
        [got] = sink.wait_for(1)
        assert worker_stamp(got.content)[1] == 1 and got.content.endswith(MSG)
        kept = wait_until(lambda: [p.name for p in relay.spool.iterdir() if ".envelope" in p.name
                                   and not p.name.endswith(".busy")], what="the crashed message back in the spool")
        assert [name for name in kept if not name.endswith(".bad")] == kept  # kept for a retry, not failed
        assert b"X-Misbehave: crash" in spooled(relay)[0]
        assert relay.proc.poll() is None
    finally:
        sink.stop()

def test_rejecter_refuses_big_and_forbidden_messages_with_its_codes(libs, relay_process):
    relay = relay_process("--filter", f"so:{libs}/libreject.so;max=2000;word=lottery win")
    code, text = send(relay.port, MSG + (b"x" * 70 + b"\r\n") * 40)
    assert code == 552 and "Message too big" in text and "the limit is 2000" in text
    code, text = send(relay.port, MSG.replace(b"hello", b"You made a LOTTERY Win!"))
    assert code == 550 and "Message refused by content policy" in text
    assert "lottery win" not in text
    assert send(relay.port) == (250, "")
    assert len(spooled(relay)) == 1
    assert "forbidden word 'lottery win'" in relay.log  # the operator's log says why


def test_a_rejecter_code_in_the_4xx_range_is_a_temporary_failure(libs, relay_process):
    relay = relay_process("--filter", f"so:{libs}/libreject.so;word=greylist-me;code=451")
    code, text = send(relay.port, MSG + b"greylist-me\r\n")
    assert code == 451 and "Message refused by content policy" in text
    assert spooled(relay) == []


def test_verdict_exit_codes_mean_what_they_mean_for_emailrelay_filters(libs, relay_process):
    relay = relay_process("--filter", f"so:{libs}/libmisbehave.so")
    assert send(relay.port, b"X-Misbehave: exit=1 451 try again soon\r\n" + MSG) == (451, "4.7.1 try again soon")
    assert send(relay.port, b"X-Misbehave: exit=5 not wanted here\r\n" + MSG) == (550, "5.7.1 not wanted here")
    assert send(relay.port, b"X-Misbehave: exit=100\r\n" + MSG) == (250, "")  # abandoned: acknowledged, dropped
    code, _ = send(relay.port, b"X-Misbehave: error\r\n" + MSG)                 # the filter's own failure
    assert code == 451
    assert spooled(relay) == []


def test_inprocess_mode_runs_the_filter_inside_the_daemon(libs, relay_process):
    relay = relay_process("--filter", f"so:inprocess:{libs}/libmisbehave.so,"
                                      f"so:inprocess:{libs}/libstamp.so;X-In: process")
    assert send(relay.port) == (250, "")
    assert send(relay.port) == (250, "")
    first, second = spooled(relay)
    assert first.startswith(b"X-In: process\r\nX-Misbehave-Worker: ")
    assert worker_stamp(first[len(b"X-In: process\r\n"):]) == (relay.proc.pid, 1)
    assert worker_stamp(second[len(b"X-In: process\r\n"):]) == (relay.proc.pid, 2)
    assert "worker pid" not in relay.log


@pytest.mark.parametrize("how, signal_name", [("crash", "SIGSEGV"), ("abort", "SIGABRT")])
def test_a_crashing_filter_gives_451_and_the_daemon_keeps_serving(libs, relay_process, how, signal_name):
    relay = relay_process("--filter", f"so:{libs}/libmisbehave.so")
    code, text = send(relay.port, f"X-Misbehave: {how}\r\n".encode() + MSG)
    assert code == 451 and "try again later" in text
    assert relay.proc.poll() is None
    assert re.search(rf"filter=so:libmisbehave.so worker pid=\d+ killed by signal {signal_name}", relay.log)
    assert spooled(relay) == []  # refused, not half-kept: the client still has it and retries
    assert send(relay.port) == (250, "")
    assert len(spooled(relay)) == 1


def test_the_worker_is_reused_and_restarted_after_a_crash(libs, relay_process):
    relay = relay_process("--filter", f"so:{libs}/libmisbehave.so")
    assert send(relay.port) == (250, "")
    assert send(relay.port) == (250, "")
    assert send(relay.port, b"X-Misbehave: crash\r\n" + MSG)[0] == 451
    assert send(relay.port) == (250, "")
    stamps = [worker_stamp(content) for content in spooled(relay)]
    (pid1, calls1), (pid1_again, calls2), (pid2, calls3) = stamps
    assert pid1 == pid1_again and (calls1, calls2) == (1, 2)   # one worker for many messages
    assert pid2 != pid1 and calls3 == 1                        # a fresh one after the crash
    assert relay.proc.pid not in (pid1, pid2)                  # isolated: not the daemon
    with pytest.raises(ProcessLookupError):
        os.kill(pid1, 0)
    assert relay.stop() == 0
    wait_until(lambda: not Path(f"/proc/{pid2}").exists(), timeout=10, what="the worker to end with the relay")


def test_a_hanging_filter_gives_451_within_the_timeout(libs, relay_process):
    relay = relay_process("--filter", f"so:{libs}/libmisbehave.so", "--filter-timeout", "1")
    started = time.monotonic()
    code, _ = send(relay.port, b"X-Misbehave: hang\r\n" + MSG)
    elapsed = time.monotonic() - started
    assert code == 451
    assert 1.0 <= elapsed < 4.0
    assert "gave no answer within 1s" in relay.log
    assert send(relay.port) == (250, "")
    assert relay.proc.poll() is None


def test_a_hanging_inprocess_filter_gives_451_and_the_relay_still_stops(libs, relay_process):
    relay = relay_process("--filter", f"so:inprocess:{libs}/libmisbehave.so", "--filter-timeout", "1")
    started = time.monotonic()
    assert send(relay.port, b"X-Misbehave: hang\r\n" + MSG)[0] == 451
    assert time.monotonic() - started < 4.0
    assert send(relay.port)[0] == 451  # the stuck call cannot be stopped: fail safe, keep nothing
    assert spooled(relay) == []
    assert "cannot be stopped" in relay.log
    assert relay.stop(timeout=15) == 0


@pytest.mark.parametrize("spec, says", [
    ("so:{libs}/libbadabi.so", "built for filter ABI version 999; this relay speaks 1"),
    ("so:inprocess:{libs}/libbadabi.so", "built for filter ABI version 999"),
    ("so:{libs}/libnoabi.so", "does not export mailrelay_filter_abi_version"),
    ("so:{libs}/libmissing.so", "libmissing.so is not a file"),
    ("so:{libs}/libreject.so;max=lots", "reject: max=lots is not a number"),
    ("so:{libs}/libmisbehave.so;fail-init", "asked to fail in init"),
    ("so:{libs}/libmisbehave.so;crash-init", "killed by signal SIGSEGV"),
], ids=["abi-mismatch", "abi-mismatch-inprocess", "no-abi-symbol", "missing-file", "bad-argument",
        "init-refuses", "init-crashes"])
def test_an_unusable_library_stops_start_up_with_the_reason(libs, relay_process, spec, says):
    relay = relay_process("--filter", spec.format(libs=libs), wait=False)
    assert relay.proc.wait(30) != 0
    assert says in relay.log
