"""POP3 benchmark: RETR throughput from a 10,000-message maildir, and the server's memory.

One relay process (``python -m mailrelay --no-smtp --pop --pop-by-name``, uvloop when installed)
serves two maildirs built here: ``empty`` (no messages) and ``bench`` (N messages of about
``--size`` octets, CRLF lines, some starting with a dot). In this order, all in one run:

1. ``empty`` logs in and quits; the server's peak RSS (VmHWM) afterwards is the baseline;
2. ``bench`` logs in (the first login reads each message once for its exact size), LISTs,
   RETRs every message with poplib and checks each against its LIST size; QUIT without DELE;
3. ``bench`` logs in again (sizes now cached), RETRs all again, then DELEs all and QUITs: the
   UPDATE state removes N files, and the maildir must be empty afterwards;
4. the baseline for throughput: this process reads the same N files straight from disk (the
   second build of the maildir), no protocol.

The server's peak RSS after each step is read from /proc; growth over the empty-mailbox baseline
shows whether the mailbox is held in memory (it must not be: only names and sizes are).

    python bench/pop3.py [--messages 10000] [--size 4096] [--tmpdir DIR]

Output, one line per figure; exit status 1 if any check failed (INVALID).
"""

from __future__ import annotations

import argparse
import os
import poplib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
READY_TIMEOUT = 30.0


class BenchError(Exception):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vm(pid: int, key: str) -> float:
    """A /proc/PID/status field (VmHWM, VmRSS) in MB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise BenchError(f"/proc/{pid}/status has no {key}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of process ``pid`` so far (all threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def message(n: int, size: int) -> bytes:
    head = (f"From: sender@bench.test\r\nTo: bench@bench.test\r\nSubject: message {n}\r\n"
            f"Message-ID: <{n}@bench.test>\r\n\r\n").encode()
    line = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"
    body = bytearray()
    i = 0
    while len(head) + len(body) < size:
        body += (b"." if i % 10 == 0 else b"") + line  # every tenth line starts with a dot
        i += 1
    return head + bytes(body)


def build_maildir(box: Path, messages: int, size: int) -> int:
    """Write ``messages`` messages into box/new the way deliver: does; return the total octets."""
    for sub in ("tmp", "new", "cur"):
        (box / sub).mkdir(parents=True, exist_ok=True)
    total = 0
    start = int(time.time()) - messages
    for n in range(messages):
        data = message(n, size)
        path = box / "new" / f"{start + n}.M{n}P1Q{n}.bench"
        path.write_bytes(data)
        os.utime(path, ns=(time.time_ns(), (start + n) * 10**9))  # delivery order = name order
        total += len(data)
    return total


def wait_ready(port: int, proc: subprocess.Popen) -> None:
    end = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise BenchError(f"relay exited with {proc.returncode} during start-up")
        try:
            with socket.create_connection(("127.0.0.1", port), 0.5) as s:
                if s.recv(100).startswith(b"+OK"):
                    return
        except OSError:
            time.sleep(0.05)
    raise BenchError("the POP3 server did not answer")


def session(port: int, user: str) -> poplib.POP3:
    client = poplib.POP3("127.0.0.1", port, timeout=60)
    client.user(user)
    client.pass_(f"{user}-pw")
    return client


def retrieve_all(client: poplib.POP3) -> tuple[int, int, float]:
    """RETR every message; (messages, octets, seconds). Each must match its LIST size."""
    sizes = [int(line.split()[1]) for line in client.list()[1]]
    started = time.perf_counter()
    octets = 0
    for number, size in enumerate(sizes, 1):
        _, lines, _ = client.retr(number)
        got = sum(len(line) + 2 for line in lines)  # poplib un-stuffs and strips the CRLFs
        if got != size:
            raise BenchError(f"message {number}: LIST said {size} octets, RETR sent {got}")
        octets += got
    return len(sizes), octets, time.perf_counter() - started


def read_files(box: Path) -> tuple[int, float]:
    started = time.perf_counter()
    count = 0
    for path in sorted((box / "new").iterdir()):
        with open(path, "rb") as f:
            f.read()
        count += 1
    return count, time.perf_counter() - started


def run(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="pop3-bench-", dir=args.tmpdir))
    try:
        mail = work / "mail"
        build_maildir(mail / "empty", 0, args.size)
        octets = build_maildir(mail / "bench", args.messages, args.size)
        secrets = work / "pop.secrets"
        secrets.write_text("server plain empty empty-pw\nserver plain bench bench-pw\n")
        conf = work / "relay.conf"
        conf.write_text(f'[pop3]\ndirectory = "{mail}"\nfailure_delay = 0\n')
        port = free_port()
        log = open(work / "relay.log", "wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "mailrelay", "-c", str(conf), "--no-daemon", "--no-smtp", "--log", "--no-syslog",
             "--spool-dir", str(work / "spool"), "--pop", "--pop-port", str(port), "--pop-auth", str(secrets),
             "--pop-by-name"], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            wait_ready(port, proc)
            session(port, "empty").quit()
            baseline = vm(proc.pid, "VmHWM")

            started = time.perf_counter()
            client = session(port, "bench")
            first_login = time.perf_counter() - started
            server_cpu, client_cpu = cpu_seconds(proc.pid), time.process_time()
            count, sent, seconds = retrieve_all(client)
            server_cpu, client_cpu = cpu_seconds(proc.pid) - server_cpu, time.process_time() - client_cpu
            client.quit()
            peak_first = vm(proc.pid, "VmHWM")
            if count != args.messages or sent != octets:
                raise BenchError(f"retrieved {count} messages, {sent} octets; stored {args.messages}, {octets}")

            started = time.perf_counter()
            client = session(port, "bench")
            second_login = time.perf_counter() - started
            count2, _, seconds2 = retrieve_all(client)
            for number in range(1, count2 + 1):
                client.dele(number)
            started = time.perf_counter()
            client.quit()
            update = time.perf_counter() - started
            peak = vm(proc.pid, "VmHWM")
            rss_now = vm(proc.pid, "VmRSS")
            left = list((mail / "bench" / "new").iterdir()) + list((mail / "bench" / "cur").iterdir())
            if left:
                raise BenchError(f"{len(left)} messages left after DELE of all and QUIT")
        finally:
            proc.terminate()
            proc.wait(30)
            log.close()
        build_maildir(mail / "again", args.messages, args.size)
        subprocess.run(["sync"], check=False)
        raw_count, raw_seconds = read_files(mail / "again")
    except BenchError as e:
        print(f"INVALID: {e}  (log: {work / 'relay.log'})")
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    mb = octets / 2**20
    print(f"mailbox         messages={args.messages} size_mb={mb:.1f}")
    print(f"pop3-retr       msgs/s={count / seconds:.0f} mb/s={mb / seconds:.1f} first_login_s={first_login:.2f} "
          f"server_cpu_ms/msg={server_cpu * 1000 / count:.2f} poplib_cpu_ms/msg={client_cpu * 1000 / count:.2f}")
    print(f"pop3-retr-again msgs/s={count2 / seconds2:.0f} login_s={second_login:.2f} quit_delete_all_s={update:.2f}")
    print(f"read-files      msgs/s={raw_count / raw_seconds:.0f} (baseline: the same files read from disk, no POP3)")
    print(f"server-rss      empty_baseline_mb={baseline:.1f} peak_after_first_pass_mb={peak_first:.1f} "
          f"peak_mb={peak:.1f} growth_mb={peak - baseline:.1f} rss_at_end_mb={rss_now:.1f}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=4096, help="octets per message (about)")
    parser.add_argument("--tmpdir", default=None, help="where to build the maildirs (default: $TMPDIR)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
