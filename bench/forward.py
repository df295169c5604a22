"""Forwarding benchmark: how fast the relay empties a spool into next hops, against plain smtplib.

Spools N messages of about S bytes for recipients spread over D domains (``d0.test`` ...), one
postfix ``smtp-sink`` per domain on its own loopback port (so each domain is a destination with
its own connection pool, as with real MX hosts), and times, in the same run:

    forward        python -m mailrelay --as-client ... with a [routes] table, one route per domain:
                   forwards the whole spool once and exits
    plain-smtplib  this process, one smtplib connection per message, no pipelining, sequential,
                   reading the same spool files (the first --plain-messages of them)

The spool is written before the clock starts (``mailrelay.spool.Spool.write``, E-MailRelay's
format, flushed with one sync), so only forwarding is timed. ``--as-client``'s default
destination is a closed port: a message the routing table misses is deferred and the run is
INVALID. A run is also INVALID unless the relay exits 0, the spool holds no message files
afterwards and every sink counted exactly its domain's share (``smtp-sink -c``).

Figures for ``forward``: ``msgs/s`` excludes start-up and shutdown (from the relay's own log:
the ``relay started`` line to the last ``delivered`` line); ``msgs/s_wall`` is N over process
start to exit; ``startup_s`` is the time to the ``relay started`` line. Peak RSS and CPU
(user + system, whole process, start-up included) come from wait4(). ``--profile`` then runs the
relay once more under py-spy and prints where its time goes.

    python bench/forward.py [--messages 5000] [--size 4096] [--domains 10] [--repeat 1]
                            [--plain-messages 300] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from accept import _fmt, describe_machine, free_port, median, py_spy_path, spread  # bench/ is on sys.path
from profiles import print_py_spy

from mailrelay.spool import Envelope, Spool
from mailrelay.types import Recipient

SENDER = "bench@source.test"
HERE = Path(__file__).resolve().parent
RUN_TIMEOUT = 600.0
SINK_READY_TIMEOUT = 10.0
LOG_TIME = re.compile(rb"^(\d{8}\.\d{6})\.(\d{3}): ")


class BenchError(Exception):
    pass


# ------------------------------------------------------------------------------------------ sinks
@dataclass
class Sink:
    port: int
    proc: subprocess.Popen[bytes]
    out: Path


class Sinks:
    """One postfix smtp-sink per destination; ``counts()`` after ``stop()`` gives messages per sink."""

    def __init__(self, smtp_sink: str, workdir: Path, how_many: int):
        self.smtp_sink, self.workdir, self.how_many = smtp_sink, workdir, how_many
        self.sinks: list[Sink] = []

    def start(self) -> None:
        for i in range(self.how_many):
            self.sinks.append(self._start_one(i))

    def _start_one(self, index: int) -> Sink:
        user = ["-u", "nobody"] if os.geteuid() == 0 else []  # smtp-sink refuses to run as root without -u
        for _ in range(3):  # the free port may be taken between our check and its bind
            port = free_port()
            out = self.workdir / f"sink{index}.out"
            proc = subprocess.Popen([self.smtp_sink, *user, "-c", "-h", f"sink{index}.test",
                                     f"127.0.0.1:{port}", "256"],
                                    stdin=subprocess.DEVNULL, stdout=open(out, "wb"),
                                    stderr=open(self.workdir / f"sink{index}.err", "wb"))
            deadline = time.monotonic() + SINK_READY_TIMEOUT
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=1):
                        return Sink(port, proc, out)  # the probe is a session with no message
                except OSError:
                    time.sleep(0.02)
            proc.kill()
            proc.wait()
        err = (self.workdir / f"sink{index}.err").read_text(errors="replace").strip()
        raise BenchError(f"smtp-sink {index} did not start: {err[-300:]}")

    @property
    def ports(self) -> list[int]:
        return [s.port for s in self.sinks]

    def stop(self) -> None:
        for sink in self.sinks:
            if sink.proc.poll() is None:
                sink.proc.terminate()
        for sink in self.sinks:
            try:
                sink.proc.wait(10)
            except subprocess.TimeoutExpired:
                sink.proc.kill()
                sink.proc.wait()

    def counts(self) -> list[int]:
        """Messages each sink received: the last ``mesg=N`` of its ``-c`` counter line."""
        out = []
        for sink in self.sinks:
            found = re.findall(rb"mesg=(\d+)", sink.out.read_bytes())
            out.append(int(found[-1]) if found else 0)
        return out


# ------------------------------------------------------------------------------------------ spool
def domain_of(i: int, domains: int) -> str:
    return f"d{i % domains}.test"


def make_content(i: int, rcpt: str, size: int) -> bytes:
    head = (f"From: Bench <{SENDER}>\r\nTo: <{rcpt}>\r\nSubject: forward bench message {i}\r\n"
            f"Message-ID: <bench.{i}@source.test>\r\nDate: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n").encode()
    line = (b"The quick brown fox jumps over the lazy dog, message %d. " % i).ljust(76, b"x") + b"\r\n"
    body = line * max(1, (size - len(head)) // len(line))
    return head + body


def prepare_spool(directory: Path, messages: int, size: int, domains: int) -> list[str]:
    """Write ``messages`` ready messages (content + envelope) in E-MailRelay's format; return ids."""

    async def fill() -> list[str]:
        spool = Spool(directory, durable=False)  # one os.sync() below instead of a flush per batch
        spool.open()
        try:
            ids = []
            for start in range(0, messages, 500):
                batch = []
                for i in range(start, min(messages, start + 500)):
                    rcpt = f"user{i}@{domain_of(i, domains)}"
                    message_id = spool.new_id()
                    ids.append(message_id)
                    envelope = Envelope(sender=SENDER, recipients=(Recipient(rcpt),), content="7bit",
                                        client="127.0.0.1")
                    batch.append(spool.write(message_id, envelope, [make_content(i, rcpt, size)], commit=True))
                await asyncio.gather(*batch)
            return ids
        finally:
            spool.close()

    ids = asyncio.run(fill())
    os.sync()  # no dirty pages from the preparation left to write back during the timed run
    found = len(list(directory.glob("*.envelope")))
    if found != messages:
        raise BenchError(f"spool preparation wrote {found} envelopes, expected {messages}")
    return ids


def leftovers(directory: Path) -> list[str]:
    """Message files still in the spool (anything but the relay's own bookkeeping directories)."""
    return sorted(p.name for p in directory.iterdir() if p.is_file())


# ------------------------------------------------------------------------------------------ runs
@dataclass
class Result:
    name: str
    repeat: int
    messages: int = 0
    msgs_per_s: float = float("nan")       # forward: excluding start-up; plain: over its messages
    msgs_per_s_wall: float = float("nan")  # forward: process start to exit
    startup_s: float = float("nan")
    total_s: float = float("nan")
    peak_rss_mb: float = float("nan")
    cpu_ms_per_msg: float = float("nan")
    problem: str = ""


def run_plain(spool_dir: Path, ids: list[str], domains: int, repeat: int, workdir: Path,
              smtp_sink: str) -> Result:
    """One smtplib connection per message, no pipelining (smtplib has none), one at a time, reading
    the spool's files like the relay does; into fresh sinks so their counts can be checked."""
    result = Result("plain-smtplib", repeat, messages=len(ids))
    sinks = Sinks(smtp_sink, workdir, domains)
    sinks.start()
    expected: collections.Counter[int] = collections.Counter()
    try:
        cpu_before = time.process_time()
        started = time.perf_counter()
        for message_id in ids:
            envelope = Envelope.from_bytes((spool_dir / f"{message_id}.envelope").read_bytes())
            content = (spool_dir / f"{message_id}.content").read_bytes()
            rcpts = [r.address for r in envelope.remote_recipients]
            index = int(rcpts[0].rpartition("@")[2][1:].split(".")[0])  # dN.test -> N
            with smtplib.SMTP("127.0.0.1", sinks.ports[index], local_hostname="bench.test", timeout=30) as s:
                refused = s.sendmail(envelope.sender, rcpts, content)
            if refused:
                raise BenchError(f"plain client: {refused}")
            expected[index] += 1
        elapsed = time.perf_counter() - started
        result.total_s = elapsed
        result.msgs_per_s = len(ids) / elapsed
        result.cpu_ms_per_msg = (time.process_time() - cpu_before) * 1000 / len(ids)
    except (OSError, smtplib.SMTPException, BenchError) as e:
        result.problem = f"plain client: {type(e).__name__}: {e}"
    finally:
        sinks.stop()
    counts = sinks.counts()
    if not result.problem and counts != [expected[i] for i in range(domains)]:
        result.problem = f"sinks counted {counts}, expected {[expected[i] for i in range(domains)]}"
    return result


def write_config(workdir: Path, ports: list[int], domains: int, args: argparse.Namespace) -> Path:
    conf = workdir / "relay.conf"
    lines = ['[plugins]', 'enable = ["forward"]', '', '[spool]', f'durability = "{args.durability}"', '']
    if args.concurrency:
        lines += ['[queue]', f'concurrency = {args.concurrency}', '']
    if args.per_destination:
        lines += ['[forward]', f'connections_per_destination = {args.per_destination}', '']
    lines += ['[routes]'] + [f'"d{i}.test" = "127.0.0.1:{ports[i % len(ports)]}"' for i in range(domains)]
    conf.write_text("\n".join(lines) + "\n")
    return conf


def relay_command(spool_dir: Path, conf: Path, dead_port: int) -> list[str]:
    # --as-client: --log --no-syslog --no-daemon --dont-serve --forward --forward-to; the
    # per-domain [routes] win over its host:port, which nothing listens on.
    return [sys.executable, "-m", "mailrelay", "-c", str(conf), "--spool-dir", str(spool_dir),
            "--domain", "relay.bench.test", "--log-time", "--as-client", f"127.0.0.1:{dead_port}"]


def wait_with_rusage(proc: subprocess.Popen[bytes], timeout: float) -> tuple[int, os.struct_rusage | None]:
    """Wait for ``proc`` with wait4() (its own peak RSS and CPU); kill it after ``timeout``."""
    timer = threading.Timer(timeout, lambda: proc.poll() is None and proc.kill())
    timer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage


def log_times(stderr: bytes) -> tuple[float | None, float | None, int]:
    """(wall time of ``relay started``, of the last ``delivered`` line, number of delivered lines)."""
    started = last = None
    delivered = 0
    for line in stderr.splitlines():
        match = LOG_TIME.match(line)
        if not match:
            continue
        if b"relay started" in line or b" delivered to " in line:
            stamp = time.mktime(time.strptime(match.group(1).decode(), "%Y%m%d.%H%M%S")) + int(match.group(2)) / 1000
            if b"relay started" in line:
                started = stamp
            else:
                last, delivered = stamp, delivered + 1
    return started, last, delivered


def run_forward(name: str, spool_dir: Path, messages: int, domains: int, repeat: int, workdir: Path,
                args: argparse.Namespace, profile_to: Path | None = None) -> Result:
    """Forward the whole spool once with ``--as-client`` into fresh sinks; verify everything arrived."""
    result = Result(name, repeat, messages=messages)
    sinks = Sinks(args.smtp_sink, workdir, 1 if args.shared_sink else domains)
    sinks.start()
    conf = write_config(workdir, sinks.ports, domains, args)
    command = relay_command(spool_dir, conf, free_port())
    if profile_to is not None:
        command = [py_spy_path() or "py-spy", "record", "--format", "raw", "--function", "--threads",
                   "--rate", str(args.rate), "-o", str(profile_to), "--", *command]
    stderr_path = workdir / f"{name}.stderr"
    try:
        os.sync()
        spawned_wall = time.time()
        started = time.perf_counter()
        with open(stderr_path, "wb") as err:
            proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
            code, usage = wait_with_rusage(proc, RUN_TIMEOUT)
        result.total_s = time.perf_counter() - started
        stdout = proc.stdout.read().decode(errors="replace").strip() if proc.stdout else ""
        if proc.stdout:
            proc.stdout.close()
    finally:
        sinks.stop()
    stderr = stderr_path.read_bytes()
    if usage is not None and profile_to is None:  # under py-spy these would be py-spy's
        result.peak_rss_mb = usage.ru_maxrss / 1024
        result.cpu_ms_per_msg = (usage.ru_utime + usage.ru_stime) * 1000 / max(1, messages)
    result.msgs_per_s_wall = messages / result.total_s
    relay_started, last_delivered, delivered_lines = log_times(stderr)
    if relay_started is not None:
        result.startup_s = relay_started - spawned_wall
    if relay_started is not None and last_delivered is not None and last_delivered > relay_started:
        result.msgs_per_s = messages / (last_delivered - relay_started)

    problems = []
    if code != 0:
        tail = " | ".join(stderr.decode(errors="replace").strip().splitlines()[-3:])
        problems.append(f"relay exit {code}: {stdout} {tail}".strip())
    if messages and delivered_lines != messages:
        problems.append(f"log shows {delivered_lines} delivered, expected {messages}")
    left = leftovers(spool_dir)
    if left:
        problems.append(f"spool not empty: {len(left)} files left, e.g. {left[:3]}")
    counts = sinks.counts()
    expected = [sum(1 for i in range(messages) if i % domains % len(counts) == k) for k in range(len(counts))]
    if counts != expected:
        problems.append(f"sinks counted {counts}, expected {expected}")
    result.problem = "; ".join(problems)
    return result


# ------------------------------------------------------------------------------------------ report
def report(results: list[Result], args: argparse.Namespace) -> None:
    ok = [r for r in results if not r.problem]
    fwd = [r for r in ok if r.name == "forward"]
    plain = [r for r in ok if r.name == "plain-smtplib"]
    empty = [r for r in ok if r.name == "forward-empty"]
    ratios = []
    for rep in range(args.repeat):
        f = [r for r in fwd if r.repeat == rep]
        p = [r for r in plain if r.repeat == rep]
        if f and p and f[0].msgs_per_s == f[0].msgs_per_s:
            ratios.append(f[0].msgs_per_s / p[0].msgs_per_s)
    fields = {
        "msgs/s": median(r.msgs_per_s for r in fwd),
        "msgs/s_wall": median(r.msgs_per_s_wall for r in fwd),
        "ratio_vs_plain": median(ratios),
        "peak_rss_mb": median(r.peak_rss_mb for r in fwd),
        "cpu_ms/msg": median(r.cpu_ms_per_msg for r in fwd),
        "startup_s": median(r.startup_s for r in fwd),
        "empty_spool_run_s": median(r.total_s for r in empty),
    }
    print("forward        " + " ".join(f"{k}={_fmt(v)}" for k, v in fields.items()), flush=True)
    print(f"plain-smtplib  msgs/s={_fmt(median(r.msgs_per_s for r in plain))} "
          f"cpu_ms/msg={_fmt(median(r.cpu_ms_per_msg for r in plain))} "
          f"(first {args.plain_messages} messages, one connection each, sequential)", flush=True)
    if args.repeat > 1:
        print(f"# min..max over {args.repeat} repeats: forward msgs/s={spread(r.msgs_per_s for r in fwd)} "
              f"msgs/s_wall={spread(r.msgs_per_s_wall for r in fwd)} ratio_vs_plain={spread(ratios)} "
              f"plain msgs/s={spread(r.msgs_per_s for r in plain)}")


# (label, frame marker, parent marker): share of samples whose stack holds the marker (and the
# parent's, so a sub-phase counts only inside its phase). Markers are py-spy "function (file:line)".
PHASES = [
    ("queue scan (listdir, load_state, claim)", "QueueRunner.scan ", None),
    ("  load_state (.retry read + content stat)", "load_state ", "QueueRunner.scan "),
    ("  claim (rename, open, flock)", "claim (core/queue/claim.py", "QueueRunner.scan "),
    ("per-message forward task", "QueueRunner._forward ", None),
    ("  read envelope + content files", "read_bytes ", "QueueRunner._forward "),
    ("  client-stage filters", "filter_chain ", "QueueRunner._forward "),
    ("  route hook", "QueueRunner._routes ", "QueueRunner._forward "),
    ("  settle (events, unlink files, log)", "settle ", "QueueRunner._forward "),
    ("    unlink .busy/.content/.retry", "QueueRunner._remove ", "settle "),
    # hooks run under asyncio.wait_for (a task of their own), so deliver has its own stacks
    ("deliver hook -> SmtpClient.send", "SmtpClient.send ", None),
    ("  connect (SSL context, TCP, greeting, EHLO)", "SmtpClient._connect ", "SmtpClient.send "),
    ("    ssl.create_default_context", "create_default_context ", "SmtpClient._connect "),
    ("  the transaction (MAIL/RCPT/DATA)", "SmtpClient._transaction ", "SmtpClient.send "),
    ("logging (format + write), anywhere", "Handler.handle ", None),
    ("aiosmtplib, anywhere", "aiosmtplib/", None),
    ("interpreter start-up and imports", "<frozen importlib", None),
]


def print_phases(path: Path) -> None:
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        total += int(n)
        for label, marker, parent in PHASES:
            if marker in stack and (parent is None or parent in stack):
                counts[label] += int(n)
    if total:
        print("## forwarding path: % of all samples whose stack is in the phase (phases nest; siblings may overlap)")
        for label, _, _ in PHASES:
            print(f"{100 * counts[label] / total:>6.1f}%  {label}")


def describe_code() -> str:
    """Which code was measured: the commit, and whether the working tree differs from it."""
    repo = HERE.parent
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        changed = [line[3:] for line in subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--", "core", "plugins"], capture_output=True,
            text=True, timeout=10).stdout.splitlines()]
    except (OSError, subprocess.SubprocessError):
        return "code=?"
    return f"code={head or '?'}" + (f"+changes({','.join(changed)})" if changed else "")


# ------------------------------------------------------------------------------------------ main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", "-n", type=int, default=5000)
    parser.add_argument("--size", type=int, default=4096, help="bytes per message (headers included)")
    parser.add_argument("--domains", type=int, default=10, help="recipient domains d0.test..; one sink each")
    parser.add_argument("--shared-sink", action="store_true",
                        help="one smtp-sink for all domains (one connection pool, like a smarthost)")
    parser.add_argument("--plain-messages", type=int, default=300,
                        help="messages the plain smtplib client sends (it is slow); 0 skips it")
    parser.add_argument("--repeat", type=int, default=1, help="run everything R times, report medians")
    parser.add_argument("--concurrency", type=int, default=0, help="[queue] concurrency (default: relay's)")
    parser.add_argument("--per-destination", type=int, default=0,
                        help="[forward] connections_per_destination (default: relay's)")
    parser.add_argument("--durability", choices=("fsync", "none"), default="fsync",
                        help="[spool] durability of the forwarding relay (bounces only)")
    parser.add_argument("--profile", action="store_true", help="afterwards, forward once more under py-spy")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=15, help="functions to list per profile table")
    parser.add_argument("--smtp-sink", default=shutil.which("smtp-sink") or "/usr/sbin/smtp-sink")
    parser.add_argument("--tmpdir", default=None, help="where the spools go (default: the system temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep spools, configs and logs")
    args = parser.parse_args()
    if not os.access(args.smtp_sink, os.X_OK):
        parser.error(f"{args.smtp_sink} not found: apt-get install -y --no-install-recommends postfix")
    if args.profile and not py_spy_path():
        parser.error("py-spy is not installed: pip install py-spy")
    if args.messages < args.domains:
        parser.error("--messages must be at least --domains")
    args.plain_messages = min(args.plain_messages, args.messages)

    root = Path(tempfile.mkdtemp(prefix="mailrelay-fwd-bench-", dir=args.tmpdir))
    print(f"# forward bench: messages={args.messages} size={args.size} domains={args.domains} "
          f"sinks={1 if args.shared_sink else args.domains} plain_messages={args.plain_messages} "
          f"repeat={args.repeat} {describe_machine(root)} {describe_code()}", flush=True)
    results: list[Result] = []
    begun = time.monotonic()

    def show(r: Result, extra: str = "") -> None:
        state = f"INVALID: {r.problem}" if r.problem else "ok"
        print(f"#   run {r.repeat + 1}/{args.repeat} {r.name:<14} n={r.messages} msgs/s={_fmt(r.msgs_per_s)} "
              f"msgs/s_wall={_fmt(r.msgs_per_s_wall)} total_s={_fmt(r.total_s)} startup_s={_fmt(r.startup_s)} "
              f"rss_mb={_fmt(r.peak_rss_mb)} cpu_ms/msg={_fmt(r.cpu_ms_per_msg)} {extra}{state}", flush=True)

    try:
        for rep in range(args.repeat):
            workdir = Path(tempfile.mkdtemp(prefix=f"run{rep}-", dir=root))
            spool_dir = workdir / "spool"
            t = time.monotonic()
            ids = prepare_spool(spool_dir, args.messages, args.size, args.domains)
            print(f"#   run {rep + 1}/{args.repeat} spooled {len(ids)} messages of "
                  f"{(spool_dir / (ids[0] + '.content')).stat().st_size} bytes in {time.monotonic() - t:.1f}s",
                  flush=True)
            plain_dir = workdir / "plain-spool"  # the plain client reads a copy: the relay empties the spool
            plain_dir.mkdir()
            for message_id in ids[:args.plain_messages]:
                for suffix in (".envelope", ".content"):
                    shutil.copy2(spool_dir / f"{message_id}{suffix}", plain_dir)
            empty_dir = workdir / "empty-spool"
            empty_dir.mkdir()
            for what in (["plain", "forward"] if rep % 2 == 0 else ["forward", "plain"]):
                if what == "plain" and args.plain_messages:
                    results.append(run_plain(plain_dir, ids[:args.plain_messages], args.domains, rep,
                                             workdir, args.smtp_sink))
                    show(results[-1])
                elif what == "forward":
                    results.append(run_forward("forward-empty", empty_dir, 0, args.domains, rep, workdir, args))
                    show(results[-1], "(empty spool: start-up and shutdown; cpu_ms/msg is its total cpu_ms) ")
                    results.append(run_forward("forward", spool_dir, args.messages, args.domains, rep,
                                               workdir, args))
                    show(results[-1])
            if not args.keep:
                shutil.rmtree(workdir, ignore_errors=True)
        print(f"# {len(results)} runs in {time.monotonic() - begun:.0f}s; medians; forward msgs/s excludes "
              "start-up (relay log: 'relay started' to the last 'delivered'); ratio is forward/plain per repeat")
        report(results, args)

        if args.profile:
            workdir = Path(tempfile.mkdtemp(prefix="profile-", dir=root))
            spool_dir = workdir / "spool"
            prepare_spool(spool_dir, args.messages, args.size, args.domains)
            out = workdir / "relay.pyspy.txt"
            r = run_forward("forward", spool_dir, args.messages, args.domains, 0, workdir, args, profile_to=out)
            state = f"INVALID: {r.problem}" if r.problem else "ok"
            print(f"\n# profile of the forwarding relay with py-spy --rate {args.rate}: msgs/s={_fmt(r.msgs_per_s)} "
                  f"(under the profiler; not comparable) {state}", flush=True)
            if out.exists():
                print_py_spy(out, args.top)
                print_phases(out)
            else:
                print(f"# no profile written: {(workdir / 'forward.stderr').read_text(errors='replace')[-300:]}")
            if r.problem:
                results.append(r)
    finally:
        if args.keep:
            print(f"# kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    invalid = [r for r in results if r.problem]
    for r in invalid:
        print(f"INVALID {r.name} run {r.repeat + 1}: {r.problem}", file=sys.stderr)
    return 1 if invalid else 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
