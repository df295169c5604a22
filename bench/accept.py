"""Acceptance benchmark: how fast the relay takes mail in, against bare aiosmtpd on the same machine.

Three servers (a fourth on request), each a real process on a free loopback port with a fresh directory:

    baseline     bench/baseline_aiosmtpd.py: aiosmtpd, one file per message, no fsync
    relay-fsync  python -m mailrelay, [spool] durability = "fsync" (the default: group commit)
    relay-none   python -m mailrelay, [spool] durability = "none"
    relay-fdatasync  the same with durability "fsync" and sync_method "fsync" (file by file)

Each is flooded with N messages over C connections by postfix's ``smtp-source`` (throughput; one
connection carries many messages, ``-d``) and by ``bench/loadgen.py`` (per-message latency,
MAIL FROM to the reply after the final dot). After every flood the directory must hold exactly N
messages, or the run is reported INVALID and the exit status is 1. Peak RSS is the server's VmHWM
and CPU its utime+stime, both read from /proc just before it is stopped.

With ``--repeat R`` the whole set runs R times interleaved (the server order rotates) and each
figure is the median; ratios are taken pair by pair within a repeat. ``--profile`` then runs each
relay once more under py-spy (if installed) or cProfile and prints where its time goes.

    python bench/accept.py [--messages 5000] [--connections 20] [--size 4096] [--repeat 1]
                           [--no-reuse-too] [--profile [auto|py-spy|cprofile]]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import re
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from profiles import print_cprofile, print_py_spy  # bench/ is on sys.path when run as a script

HERE = Path(__file__).resolve().parent
SERVERS = ("baseline", "relay-fsync", "relay-none", "relay-fdatasync")
READY_TIMEOUT = 30.0
FLOOD_TIMEOUT = 600.0
STOP_TIMEOUT = 60.0
SENDER, RECIPIENT = "a@bench.test", "b@bench.test"


class BenchError(Exception):
    pass


# ------------------------------------------------------------------------------------------ servers
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_proc_status(pid: int, key: str) -> int:
    """A ``kB`` field of /proc/PID/status (VmHWM, VmRSS) in kB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise BenchError(f"/proc/{pid}/status has no {key}")


def probe_file_creation(directory: Path, keep_in: Path, files: int = 200, size: int = 4096) -> float:
    """Microseconds (wall) to create, write and close one file in ``directory``, just now.

    The probe files go into the directory itself: on ext4 what a file creation costs depends on
    the block group its directory's inodes come from, so a probe in a sub-directory could measure
    somewhere else. They are then moved to ``keep_in``, not removed: without a journal (this
    VM's root file system) ext4 skips every inode freed in the last minute (longer while its inode
    table block is dirty) on each later allocation in the group, scanning from the group's
    start, so 200 removed probe files made every file the server created next cost twice as much.
    """
    data = b"x" * size
    keep_in.mkdir(exist_ok=True)
    paths = [directory / f".fs-probe-{i}" for i in range(files)]
    started = time.perf_counter()
    for path in paths:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, data)
        os.close(fd)
    elapsed = time.perf_counter() - started
    for path in paths:
        path.rename(keep_in / path.name)
    return elapsed * 1e6 / files


def spread_directories(root: Path) -> bool:
    """Ask ext4 to place each new directory under ``root`` in a block group of its own, with
    free inodes, as it does for top-level directories (``chattr +T``, the Orlov allocator).
    False where the file system or chattr does not support it."""
    chattr = shutil.which("chattr")
    if chattr is None:
        return False
    return subprocess.run([chattr, "+T", str(root)], capture_output=True).returncode == 0


class Placement:
    """Fresh store directories where creating a file costs what it costs on a clean file system.

    On an ext4 without a journal (this VM's root file system) creating a file costs about 30 us
    in a block group with untouched free inodes and 400-900 us in one where thousands of files
    were removed in the last few minutes (by an earlier benchmark, say; see
    :func:`probe_file_creation`): a server's figure would depend on where its fresh directory
    happened to land. With ``clean`` placement each store is
    probed where it is and, when it is more than three times slower than the fastest store seen
    (and over ``SLOW_US``), set aside (kept until the end, so the next try lands elsewhere) and
    another is made; ``any`` takes the first directory, as before.
    """

    SLOW_US = 100.0
    TRIES = 12

    def __init__(self, root: Path, mode: str):
        self.root = root
        self.mode = mode
        self.best = float("inf")
        self.spread = spread_directories(root) if mode == "clean" else False

    def workdir(self, prefix: str, store_name: str) -> tuple[Path, float, int]:
        """(work directory with its empty store made, probed create cost in us, stores set aside)."""
        rejected = 0
        while True:
            workdir = Path(tempfile.mkdtemp(prefix=prefix, dir=self.root))
            store = workdir / store_name
            store.mkdir()
            create_us = probe_file_creation(store, workdir / "probe")
            slow = create_us > max(self.SLOW_US, 3 * self.best)
            if self.mode != "clean" or not slow or rejected + 1 >= self.TRIES:
                self.best = min(self.best, create_us)
                return workdir, create_us, rejected
            rejected += 1
            workdir.rename(self.root / f"set-aside-{workdir.name}")


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """utime + stime of a process (all its threads), or of one thread of it."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    with open(path) as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_split(pid: int) -> tuple[float, float]:
    """(CPU seconds of the main thread, which runs the event loop; of the process as a whole)."""
    return cpu_seconds(pid, pid), cpu_seconds(pid)


@dataclass
class Server:
    """One server process under test, with its own port and directory."""

    name: str
    workdir: Path
    profiler: str = ""          # "", "cprofile" or "py-spy"
    port: int = 0
    pid: int = 0
    proc: subprocess.Popen[bytes] | None = None
    profile_output: Path | None = None

    @property
    def store(self) -> Path:
        return self.workdir / ("mail" if self.name == "baseline" else "spool")

    def command(self) -> list[str]:
        if self.name == "baseline":
            return [sys.executable, str(HERE / "baseline_aiosmtpd.py"), "--port", str(self.port),
                    "--dir", str(self.store)]
        conf = self.workdir / "relay.conf"
        durability = self.name.removeprefix("relay-")
        # relay-fdatasync: fsync durability flushing file by file instead of one syncfs per batch.
        sync = 'sync_method = "fsync"\n' if durability == "fdatasync" else ""
        durability = "fsync" if durability == "fdatasync" else durability
        # Every load-generator connection comes from 127.0.0.1: lift the per-address cap (50).
        conf.write_text(f'[spool]\ndurability = "{durability}"\n{sync}[smtp]\nmax_connections_per_client = 0\n')
        relay = ["-m", "mailrelay", "--no-daemon", "--port", str(self.port), "--spool-dir", str(self.store),
                 "--domain", "bench.test", "-c", str(conf)]
        if self.profiler == "cprofile":
            self.profile_output = self.workdir / "relay.prof"
            return [sys.executable, "-m", "cProfile", "-o", str(self.profile_output), *relay]
        if self.profiler == "py-spy":
            self.profile_output = self.workdir / "relay.pyspy.txt"
            return [py_spy_path() or "py-spy", "record", "--format", "raw", "--function", "--threads",
                    "--rate", "250", "-o", str(self.profile_output), "--", sys.executable, *relay]
        return [sys.executable, *relay]

    def start(self) -> None:
        for _ in range(3):  # another process may take the free port between our check and its bind
            self.port = free_port()
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=open(self.workdir / "server.stderr", "ab"))
            banner = self._wait_ready()
            if banner is not None:
                match = re.search(r"\bpid (\d+)", banner)
                self.pid = int(match.group(1)) if match else self.proc.pid
                return
            if self.proc.returncode != 2:  # 2: address in use
                break
        raise BenchError(f"{self.name} did not start (exit {self.proc.returncode if self.proc else '?'}): "
                         f"{self.stderr_tail()}")

    def _wait_ready(self) -> str | None:
        assert self.proc is not None and self.proc.stdout is not None
        marker = b"ready " if self.name == "baseline" else b"SMTP on"
        buf = b""
        deadline = time.monotonic() + READY_TIMEOUT
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if sel.select(timeout=0.2):
                    chunk = os.read(self.proc.stdout.fileno(), 4096)
                    if not chunk:
                        self.proc.wait(5)
                        return None
                    buf += chunk
                    for line in buf.split(b"\n")[:-1]:
                        if marker in line:
                            return line.decode(errors="replace")
                elif self.proc.poll() is not None:
                    return None
        self.proc.kill()
        self.proc.wait()
        raise BenchError(f"{self.name} printed no ready line within {READY_TIMEOUT:.0f}s")

    def measure(self) -> tuple[float, tuple[float, float]]:
        """(peak RSS in MiB, (loop-thread, total) CPU seconds), read while the server still runs."""
        return read_proc_status(self.pid, "VmHWM") / 1024, cpu_split(self.pid)

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise BenchError(f"{self.name} did not stop within {STOP_TIMEOUT:.0f}s of SIGTERM")
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if self.proc.returncode != 0:
            raise BenchError(f"{self.name} exited with {self.proc.returncode}: {self.stderr_tail()}")

    def stored(self) -> tuple[int, str]:
        """Messages in the store, and a problem ("" when the store is consistent)."""
        names = os.listdir(self.store) if self.store.exists() else []
        if self.name == "baseline":
            return sum(n.endswith(".eml") for n in names), ""
        suffixes = collections.Counter(n[n.index(".envelope"):] if ".envelope" in n else Path(n).suffix
                                       for n in names)
        ready, content = suffixes[".envelope"], suffixes[".content"]
        others = {k: v for k, v in suffixes.items() if k not in (".envelope", ".content")}
        problem = ""
        if content != ready:
            problem = f"{content} .content files for {ready} .envelope files"
        if others:
            problem += (" " if problem else "") + "unexpected " + ", ".join(f"{v} {k}" for k, v in others.items())
        return ready, problem

    def stderr_tail(self, lines: int = 8) -> str:
        try:
            text = (self.workdir / "server.stderr").read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])


def py_spy_path() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


# ------------------------------------------------------------------------------------------ floods
@dataclass
class Flood:
    """One load generator run against one fresh server."""

    server: str
    generator: str              # "smtp-source", "smtp-source-noreuse", "loadgen"
    repeat: int
    msgs_per_s: float = 0.0
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    peak_rss_mb: float = 0.0
    cpu_ms_per_msg: float = 0.0
    loop_cpu_ms_per_msg: float = 0.0
    fs_create_us: float = float("nan")
    set_aside: int = 0          # store directories rejected as slow before this one (Placement)
    problem: str = ""


def smtp_source_command(smtp_source: str, port: int, args: argparse.Namespace, reuse: bool) -> list[str]:
    return [smtp_source, *(["-d"] if reuse else []), "-l", str(args.size), "-m", str(args.messages),
            "-s", str(args.connections), "-M", "bench.test", "-f", SENDER, "-t", RECIPIENT,
            f"127.0.0.1:{port}"]


def loadgen_command(port: int, args: argparse.Namespace) -> list[str]:
    return [sys.executable, str(HERE / "loadgen.py"), "--port", str(port), "--messages", str(args.messages),
            "--connections", str(args.connections), "--size", str(args.size)]


def flood(server_name: str, generator: str, repeat: int, args: argparse.Namespace, placement: Placement,
          profiler: str = "") -> tuple[Flood, Server]:
    result = Flood(server_name, generator, repeat)
    os.sync()  # start every run with no dirty pages left over from the last one
    store_name = Server(server_name, Path(".")).store.name
    workdir, result.fs_create_us, result.set_aside = placement.workdir(f"{server_name}-{generator}-", store_name)
    server = Server(server_name, workdir, profiler=profiler)
    server.start()
    try:
        if generator == "loadgen":
            cmd = loadgen_command(server.port, args)
        else:
            cmd = smtp_source_command(args.smtp_source, server.port, args, reuse=generator == "smtp-source")
        loop_before, cpu_before = cpu_split(server.pid)
        started = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, timeout=FLOOD_TIMEOUT)
        elapsed = time.perf_counter() - started
        if done.returncode != 0:
            result.problem = (f"{Path(cmd[0]).name} exit {done.returncode}: "
                              f"{(done.stderr or done.stdout).decode(errors='replace').strip()[-300:]}")
        if generator == "loadgen" and done.stdout.strip():
            report = json.loads(done.stdout.decode().strip().splitlines()[-1])
            result.msgs_per_s = report["msgs_per_s"]
            result.p50_ms, result.p99_ms = report["p50_ms"], report["p99_ms"]
            if report["errors"]:
                result.problem = f"loadgen: {report['errors']} errors, first: {report['first_error']}"
        else:
            result.msgs_per_s = args.messages / elapsed
        result.peak_rss_mb, (loop_after, cpu_after) = server.measure()
        result.cpu_ms_per_msg = (cpu_after - cpu_before) * 1000 / args.messages
        result.loop_cpu_ms_per_msg = (loop_after - loop_before) * 1000 / args.messages
    finally:
        try:
            server.stop()
        except BenchError as e:
            result.problem = result.problem or str(e)
    count, store_problem = server.stored()
    if count != args.messages:
        result.problem = (result.problem + "; " if result.problem else "") + \
            f"store holds {count} messages, expected {args.messages}"
    elif store_problem:
        result.problem = (result.problem + "; " if result.problem else "") + store_problem
    return result, server


# ------------------------------------------------------------------------------------------ report
def median(values: Iterable[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def spread(values: Iterable[float]) -> str:
    values = [v for v in values if v == v]
    return f"{min(values):.4g}..{max(values):.4g}" if values else "nan"


def report(floods: list[Flood], args: argparse.Namespace) -> None:
    ok = [f for f in floods if not f.problem]
    by: dict[tuple[str, str], list[Flood]] = collections.defaultdict(list)
    for f in ok:
        by[(f.server, f.generator)].append(f)

    def throughput(server: str, generator: str, repeat: int) -> float | None:
        for f in by.get((server, generator), []):
            if f.repeat == repeat:
                return f.msgs_per_s
        return None

    def ratios(server: str, generator: str) -> list[float]:
        out = []
        for r in range(args.repeat):
            a, b = throughput(server, generator, r), throughput("baseline", generator, r)
            if a and b:
                out.append(a / b)
        return out

    generators = ["smtp-source"] + (["smtp-source-noreuse"] if args.no_reuse_too else [])
    width = max(len(s) for s in args.servers)
    rows = {}
    for server in args.servers:
        src = by.get((server, "smtp-source"), [])
        lg = by.get((server, "loadgen"), [])
        everything = [f for f in ok if f.server == server]
        row = {
            "msgs/s": median(f.msgs_per_s for f in src),
            **({"msgs/s_noreuse": median(f.msgs_per_s for f in by.get((server, "smtp-source-noreuse"), []))}
               if args.no_reuse_too else {}),
            "p50_ms": median(f.p50_ms for f in lg),
            "p99_ms": median(f.p99_ms for f in lg),
            "loadgen_msgs/s": median(f.msgs_per_s for f in lg),
            "peak_rss_mb": median(max(f.peak_rss_mb for f in everything if f.repeat == r)
                                  for r in {f.repeat for f in everything}) if everything else float("nan"),
            "cpu_ms/msg": median(f.cpu_ms_per_msg for f in src),
            "loop_cpu_ms/msg": median(f.loop_cpu_ms_per_msg for f in src),
        }
        for generator in generators:
            key = "ratio_vs_baseline" if generator == "smtp-source" else "ratio_noreuse"
            row[key] = median(ratios(server, generator))
        if args.no_loadgen:
            for key in ("p50_ms", "p99_ms", "loadgen_msgs/s"):
                del row[key]
        else:
            row["ratio_loadgen"] = median(ratios(server, "loadgen"))
        rows[server] = row
        print(f"{server:<{width}}  " + " ".join(f"{k}={_fmt(v)}" for k, v in row.items()), flush=True)
    if args.repeat > 1:
        print(f"# min..max over {args.repeat} repeats:")
        for server in args.servers:
            src = by.get((server, "smtp-source"), [])
            lg = by.get((server, "loadgen"), [])
            latency = ("" if args.no_loadgen else
                       f"p50_ms={spread(f.p50_ms for f in lg)} p99_ms={spread(f.p99_ms for f in lg)} ")
            print(f"{server:<{width}}  msgs/s={spread(f.msgs_per_s for f in src)} {latency}"
                  f"ratio_vs_baseline={spread(ratios(server, 'smtp-source'))}")


def _fmt(value: float) -> str:
    if value != value:
        return "nan"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


# ------------------------------------------------------------------------------------------ profiles
def profile(args: argparse.Namespace, placement: Placement) -> None:
    tool = args.profile
    if tool == "auto":
        tool = "py-spy" if py_spy_path() else "cprofile"
    for server_name in [s for s in args.servers if s != "baseline"]:
        result, server = flood(server_name, "smtp-source", 0, args, placement, profiler=tool)
        state = f"INVALID: {result.problem}" if result.problem else "ok"
        print(f"\n# profile {server_name} with {tool}: smtp-source -d, msgs/s={_fmt(result.msgs_per_s)} "
              f"(under the profiler; not comparable) {state}", flush=True)
        if server.profile_output is None or not server.profile_output.exists():
            print(f"# no profile written; server stderr: {server.stderr_tail()}")
            continue
        if tool == "cprofile":
            print_cprofile(server.profile_output, args.top, args.messages)
        else:
            print_py_spy(server.profile_output, args.top)


# ------------------------------------------------------------------------------------------ main
def describe_machine(root: Path) -> str:
    try:
        import uvloop  # noqa: F401
        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    fs = "?"
    try:
        best = ""
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mount, fstype, *_ = line.split()
            if str(root).startswith(mount) and len(mount) > len(best):
                best, fs = mount, fstype
    except OSError:
        pass
    return (f"python={platform.python_version()} loop={loop} cpus={os.cpu_count()} "
            f"spool_fs={fs} tmp={root}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", "-n", type=int, default=5000)
    parser.add_argument("--connections", "-c", type=int, default=20)
    parser.add_argument("--size", type=int, default=4096, help="payload bytes per message (smtp-source -l)")
    parser.add_argument("--repeat", type=int, default=1, help="run the whole set R times, report medians")
    parser.add_argument("--servers", default=",".join(SERVERS),
                        help=f"comma-separated subset of {','.join(SERVERS)} (baseline is always run)")
    parser.add_argument("--no-reuse-too", action="store_true",
                        help="also flood with smtp-source without -d: one connection per message")
    parser.add_argument("--no-loadgen", action="store_true", help="skip the latency runs")
    parser.add_argument("--profile", nargs="?", const="auto", choices=("auto", "py-spy", "cprofile"),
                        help="afterwards, profile each relay under py-spy (if installed) or cProfile")
    parser.add_argument("--profile-only", action="store_true", help="skip the measured runs, only profile")
    parser.add_argument("--top", type=int, default=15, help="functions to list per profile table")
    parser.add_argument("--smtp-source", default=shutil.which("smtp-source") or "/usr/sbin/smtp-source")
    parser.add_argument("--tmpdir", default=None, help="where the spools go (default: the system temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the spools and logs")
    parser.add_argument("--placement", choices=("clean", "any"), default="clean",
                        help="clean (default): every store in a block group where files are created "
                             "at clean-file-system speed (see Placement); any: wherever it lands")
    args = parser.parse_args()
    args.servers = ["baseline"] + [s for s in args.servers.split(",") if s and s != "baseline"]
    unknown = set(args.servers) - set(SERVERS)
    if unknown:
        parser.error(f"unknown server(s): {', '.join(sorted(unknown))}")
    if not os.access(args.smtp_source, os.X_OK):
        parser.error(f"{args.smtp_source} not found: apt-get install -y --no-install-recommends postfix")
    if args.profile == "py-spy" and not py_spy_path():
        parser.error("py-spy is not installed: pip install py-spy")

    root = Path(tempfile.mkdtemp(prefix="mailrelay-bench-", dir=args.tmpdir))
    placement = Placement(root, args.placement)
    generators = ["smtp-source"] + (["smtp-source-noreuse"] if args.no_reuse_too else []) \
        + ([] if args.no_loadgen else ["loadgen"])
    print(f"# accept bench: messages={args.messages} connections={args.connections} size={args.size} "
          f"repeat={args.repeat} {describe_machine(root)} placement={args.placement}"
          f"{' (chattr +T)' if placement.spread else ''}", flush=True)
    floods: list[Flood] = []
    started = time.monotonic()
    if args.profile_only:
        args.profile = args.profile or "auto"
        args.repeat = 0
    try:
        for repeat in range(args.repeat):
            order = args.servers[repeat % len(args.servers):] + args.servers[:repeat % len(args.servers)]
            for generator in generators:
                for server_name in order:
                    result, server = flood(server_name, generator, repeat, args, placement)
                    floods.append(result)
                    # Every store stays until the end: removing 10,000 files here would slow file
                    # creation in the next runs' stores (see probe_file_creation).
                    state = f"INVALID: {result.problem}" if result.problem else "ok"
                    latency = (f"p50_ms={_fmt(result.p50_ms)} p99_ms={_fmt(result.p99_ms)} "
                               if generator == "loadgen" else "")
                    print(f"#   run {repeat + 1}/{args.repeat} {server_name:<11} {generator:<19} "
                          f"msgs/s={_fmt(result.msgs_per_s)} {latency}rss_mb={_fmt(result.peak_rss_mb)} "
                          f"cpu_ms/msg={_fmt(result.cpu_ms_per_msg)} "
                          f"loop_cpu_ms/msg={_fmt(result.loop_cpu_ms_per_msg)} "
                          f"fs_create_us={_fmt(result.fs_create_us)} set_aside={result.set_aside} {state}",
                          flush=True)
        if floods:
            print(f"# {len(floods)} runs in {time.monotonic() - started:.0f}s; medians "
                  "(msgs/s, cpu from smtp-source -d; p50/p99 from loadgen; ratios relay/baseline pair by pair)")
            report(floods, args)
        if args.profile:
            profile(args, placement)
    finally:
        if args.keep:
            print(f"# kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    invalid = [f for f in floods if f.problem]
    for f in invalid:
        print(f"INVALID {f.server} {f.generator} run {f.repeat + 1}: {f.problem}", file=sys.stderr)
    return 1 if invalid else 0


if __name__ == "__main__":
    sys.exit(main())
