"""Run one filter program: no shell, a reduced environment, a time limit, bounded output.

The program gets its own session (process group), so a timeout kills it and anything it started;
stdout is kept up to a limit and the rest drained, so a chatty or hostile filter cannot exhaust
memory or block on a full pipe.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from dataclasses import dataclass

# E-MailRelay runs filters with PATH=/usr/bin:/bin and IFS only; we add nothing else by default.
MINIMAL_ENV = {"PATH": "/usr/bin:/bin", "IFS": " \t\n"}


@dataclass(frozen=True)
class ProgramRun:
    """How a program run ended. ``exit_code`` is negative for a signal; ``timed_out`` when we killed it."""

    exit_code: int
    stdout: bytes
    stderr: bytes
    timed_out: bool = False
    truncated: bool = False
    error: str = ""   # the program could not be started (missing, not executable)


def clean_env_value(value: str) -> str:
    """Environment values are single-line data: CR, LF and NUL cannot appear in them."""
    return value.replace("\r", " ").replace("\n", " ").replace("\0", "")


async def run_program(argv: list[str], *, env: dict[str, str], timeout: float, stdin: bytes | None = None,
                      max_stdout: int = 1 << 16, cwd: str | None = None) -> ProgramRun:
    """Run ``argv`` (argv[0] a path; never a shell) and collect its result."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, env={k: clean_env_value(v) for k, v in env.items()}, cwd=cwd,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True)
    except OSError as e:
        return ProgramRun(-1, b"", b"", error=f"cannot run {argv[0]}: {e.strerror or e}")

    async def feed() -> None:
        assert proc.stdin is not None
        try:
            proc.stdin.write(stdin or b"")
            await proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass  # a filter may decide without reading all of its input
        finally:
            with contextlib.suppress(OSError):
                proc.stdin.close()

    async def collect(stream: asyncio.StreamReader, limit: int) -> tuple[bytes, bool]:
        kept = bytearray()
        truncated = False
        while chunk := await stream.read(1 << 16):
            room = limit - len(kept)
            if room > 0:
                kept += chunk[:room]
            if len(chunk) > room:
                truncated = True
        return bytes(kept), truncated

    assert proc.stdout is not None and proc.stderr is not None
    work = [collect(proc.stdout, max_stdout), collect(proc.stderr, 1 << 14), proc.wait()]
    if stdin is not None:
        work.append(feed())
    gathered = asyncio.gather(*work)
    try:
        async with asyncio.timeout(timeout):
            (out, truncated), (err, _), code, *_ = await gathered
    except TimeoutError:
        _kill_group(proc)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(proc.wait(), 5)
        gathered.cancel()
        with contextlib.suppress(BaseException):
            await gathered
        return ProgramRun(-signal.SIGKILL, b"", b"", timed_out=True)
    except asyncio.CancelledError:
        _kill_group(proc)
        raise
    return ProgramRun(code, out, err, truncated=truncated)


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
