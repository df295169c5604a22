"""Printing profiles for bench/accept.py: cProfile stats files and py-spy raw (collapsed) stacks."""

from __future__ import annotations

import collections
import re
from pathlib import Path


def print_cprofile(path: Path, top: int, messages: int) -> None:
    import pstats
    stats = pstats.Stats(str(path))
    entries = stats.stats  # type: ignore[attr-defined]
    total = sum(tt for (_, _, tt, _, _) in entries.values()) or 1.0
    rows = [(func, nc, tt, ct) for func, (_, nc, tt, ct, _) in entries.items()]

    def name(func: tuple[str, int, str]) -> str:
        filename, line, function = func
        if filename == "~":
            return function
        return f"{function} ({_short_path(filename)}:{line})"

    print(f"# main thread only (the event loop; not the spool-commit thread); {total:.2f}s profiled, "
          "including the loop's own C code and its waits, which count as self time of asyncio's run")
    floor = max(100, messages // 2)  # per-message functions only: drops start-up and imports
    for title, index, floor in (("self (tottime)", 2, 0), (f"cumulative (cumtime), called >= {floor} times",
                                                          3, floor)):
        print(f"## top {top} by {title}")
        print(f"{'calls':>9} {'self_s':>8} {'cum_s':>8} {'self%':>6} {'cum%':>6}  function")
        chosen = [r for r in rows if r[1] >= floor]
        for func, nc, tt, ct in sorted(chosen, key=lambda r: r[index], reverse=True)[:top]:
            print(f"{nc:>9} {tt:>8.3f} {ct:>8.3f} {100 * tt / total:>5.1f}% {100 * ct / total:>5.1f}%  {name(func)}")


def print_py_spy(path: Path, top: int) -> None:
    self_samples: collections.Counter[str] = collections.Counter()
    cumulative: collections.Counter[str] = collections.Counter()
    per_thread: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short_frame(f) for f in stack.split(";")]
        thread, frames = (frames[0], frames[1:]) if frames and frames[0].startswith("thread") else ("", frames)
        if not frames:
            continue
        total += count
        per_thread[thread] += count
        self_samples[frames[-1]] += count
        for frame in set(frames):
            cumulative[frame] += count
    if not total:
        print("# py-spy recorded no samples")
        return
    print(f"# {total} non-idle samples, all threads; % of those. by thread: "
          + ", ".join(f"{t or '?'}={100 * n / total:.0f}%" for t, n in per_thread.most_common()))
    for title, counter in (("self", self_samples), ("cumulative, start-up and thread wrappers left out",
                                                     collections.Counter({f: n for f, n in cumulative.items()
                                                                          if not _is_wrapper(f)}))):
        print(f"## top {top} by {title}")
        for frame, n in counter.most_common(top):
            print(f"{100 * n / total:>6.1f}%  {frame}")


WRAPPERS = ("threading.py", "runpy", "click/", "core/cli/", "core/daemon.py", "core/__main__.py", "<frozen",
            "asyncio/runners.py", "GroupCommitter._run ")


def _is_wrapper(frame: str) -> bool:
    """Frames every sample of a thread passes through: they say nothing about where time goes."""
    return any(marker in frame for marker in WRAPPERS)


def _short_frame(frame: str) -> str:
    match = re.match(r"(.*) \((.*)\)$", frame)
    if not match:
        return frame
    return f"{match.group(1)} ({_short_path(match.group(2))})"


def _short_path(filename: str) -> str:
    for marker in ("site-packages/", "/lib/python3", "/work/main/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename
