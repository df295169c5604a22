"""Filter benchmark: what each kind of server filter costs in accept throughput, against no filter.

Each configuration is a real ``python -m mailrelay`` process with one ``--filter`` on a fresh
spool (fsync durability, as in production), flooded by postfix's ``smtp-source`` with N messages
over C connections:

    none          no filter (the baseline of every ratio)
    exit          exit:0, the chain's own overhead
    program       a shell script that exits 0 (E-MailRelay's contract: a process per message)
    pipe          pipe: through cat (a process per message, the message out and back in)
    so-isolated   so: header stamper from filters_c/, in its supervised worker process
    so-inprocess  the same library loaded into the daemon

With ``--repeat R`` the set runs R times, the order rotating, and ratios are paired within a
repeat; the figures printed are medians. The store must hold exactly N messages afterwards, or
the run is INVALID (exit status 1).

    python bench/filters.py [--messages 2000] [--connections 20] [--size 4096] [--repeat 1]
                            [--configs none,exit,program,pipe,so-isolated,so-inprocess]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from accept import BenchError, Server, median, smtp_source_command, spread  # bench/ is on sys.path

HERE = Path(__file__).resolve().parent
CONFIGS = ("none", "exit", "program", "pipe", "so-isolated", "so-inprocess")
FLOOD_TIMEOUT = 900.0


@dataclass
class FilterServer(Server):
    """A relay with one server filter (``filter_spec`` empty: none)."""

    filter_spec: str = ""

    def command(self) -> list[str]:
        command = super().command()
        return command + (["--filter", self.filter_spec] if self.filter_spec else [])


def build_so(workdir: Path) -> Path:
    """Compile the header stamper from filters_c/ with the system C compiler."""
    source = HERE.parent / "filters_c"
    out = workdir / "so"
    shutil.copytree(source, out)
    subprocess.run(["make", "-s", "-C", str(out)], check=True)
    found = sorted(out.glob("*stamp*.so"))
    if not found:
        raise BenchError(f"no stamper library built in {out}")
    return found[0]


def specs(workdir: Path, wanted: list[str]) -> dict[str, str]:
    script = workdir / "ok.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o755)
    cat = workdir / "cat.sh"
    cat.write_text("#!/bin/sh\nexec cat\n")
    cat.chmod(0o755)
    table = {"none": "", "exit": "exit:0", "program": str(script), "pipe": f"pipe:{cat}"}
    if any(name.startswith("so-") for name in wanted):
        library = build_so(workdir)
        table.update({"so-isolated": f"so:{library};X-Bench: stamped",
                      "so-inprocess": f"so:inprocess:{library};X-Bench: stamped"})
    return table


def flood(name: str, spec: str, args: argparse.Namespace, root: Path) -> tuple[float, str]:
    """msgs/s of one run, and a problem ("" when the store is consistent)."""
    workdir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))
    os.sync()
    server = FilterServer("relay-fsync", workdir, filter_spec=spec)
    server.start()
    problem = ""
    try:
        started = time.perf_counter()
        done = subprocess.run(smtp_source_command(args.smtp_source, server.port, args, reuse=True),
                              capture_output=True, timeout=FLOOD_TIMEOUT)
        rate = args.messages / (time.perf_counter() - started)
        if done.returncode != 0:
            problem = f"smtp-source exit {done.returncode}: {done.stderr.decode(errors='replace')[-200:]}"
    finally:
        try:
            server.stop()
        except BenchError as e:
            problem = problem or str(e)
    count, store_problem = server.stored()
    if count != args.messages:
        problem = (problem + "; " if problem else "") + f"store holds {count}, expected {args.messages}"
    return rate, problem or store_problem


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", "-n", type=int, default=2000)
    parser.add_argument("--connections", "-c", type=int, default=20)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--smtp-source", default=shutil.which("smtp-source") or "/usr/sbin/smtp-source")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    wanted = [c for c in args.configs.split(",") if c]
    unknown = set(wanted) - set(CONFIGS)
    if unknown or "none" not in wanted:
        parser.error(f"configs must include 'none' and come from {', '.join(CONFIGS)}")
    root = Path(tempfile.mkdtemp(prefix="mailrelay-filters-bench-"))
    invalid = False
    try:
        table = specs(root, wanted)
        rates: dict[str, list[float]] = {c: [] for c in wanted}
        ratios: dict[str, list[float]] = {c: [] for c in wanted}
        for repeat in range(args.repeat):
            order = wanted[repeat % len(wanted):] + wanted[:repeat % len(wanted)]
            this: dict[str, float] = {}
            for name in order:
                rate, problem = flood(name, table[name], args, root)
                print(f"  run {repeat + 1} {name:<13} msgs/s={rate:8.1f}{'  INVALID: ' + problem if problem else ''}",
                      file=sys.stderr)
                invalid |= bool(problem)
                this[name] = rate
                rates[name].append(rate)
            for name in wanted:
                ratios[name].append(this[name] / this["none"])
        print(f"filters: {args.messages} msgs x {args.size} B, {args.connections} connections, "
              f"{args.repeat} repeat(s); medians (min-max)")
        for name in wanted:
            print(f"{name:<13} spec={table[name] or '-':<40.40} msgs/s={median(rates[name]):8.1f}  "
                  f"ratio_vs_none={median(ratios[name]):.2f} ({spread(ratios[name])})")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 1 if invalid else 0


if __name__ == "__main__":
    sys.exit(main())
