"""A small SMTP load generator that measures per-message latency (for bench/accept.py).

C connections share N messages; each connection says EHLO once and then sends message after
message (MAIL, RCPT, DATA, content, no pipelining), so connects do not dominate. A message's
latency is the time from writing MAIL FROM to reading the reply after the final dot: what a
client waits for one acknowledged message.

    python bench/loadgen.py --port PORT [--messages 5000] [--connections 20] [--size 4096]

Prints one JSON object: messages, errors, elapsed_s, msgs_per_s, p50_ms, p90_ms, p99_ms, max_ms.
Exit status 1 when any message was not accepted with a 2xx reply.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

IO_TIMEOUT = 60.0


class SmtpError(Exception):
    pass


def make_message(size: int) -> bytes:
    """Headers plus ``size`` bytes of 80-octet lines, like ``smtp-source -l size``."""
    header = (b"From: <a@bench.test>\r\nTo: <b@bench.test>\r\nSubject: bench\r\n"
              b"Message-Id: <bench@bench.test>\r\n\r\n")
    lines = []
    remaining = size
    n = 1
    while remaining > 0:
        text = str(n).encode()
        width = min(78, max(remaining - 2, len(text)))
        line = (text + b"X" * 78)[:width] + b"\r\n"
        lines.append(line)
        remaining -= len(line)
        n += 1
    return header + b"".join(lines)


async def read_reply(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    lines = []
    while True:
        line = await asyncio.wait_for(reader.readline(), IO_TIMEOUT)
        if not line:
            raise SmtpError("connection closed by server")
        lines.append(line)
        if len(line) < 4 or line[3:4] != b"-":
            break
    try:
        code = int(lines[-1][:3])
    except ValueError:
        raise SmtpError(f"bad reply {lines[-1]!r}") from None
    return code, b"".join(lines)


async def expect(reader: asyncio.StreamReader, want: int, what: str) -> None:
    code, text = await read_reply(reader)
    if code != want:
        raise SmtpError(f"{what}: expected {want}, got {text.decode(errors='replace').strip()}")


async def connection(host: str, port: int, queue: list[int], payload: bytes,
                     latencies: list[float], errors: list[str]) -> None:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), IO_TIMEOUT)
    try:
        await expect(reader, 220, "greeting")
        writer.write(b"EHLO loadgen.bench.test\r\n")
        await expect(reader, 250, "EHLO")
        mail = b"MAIL FROM:<a@bench.test>\r\n"
        rcpt = b"RCPT TO:<b@bench.test>\r\n"
        while queue:
            queue.pop()
            start = time.perf_counter()
            writer.write(mail)
            await expect(reader, 250, "MAIL")
            writer.write(rcpt)
            await expect(reader, 250, "RCPT")
            writer.write(b"DATA\r\n")
            await expect(reader, 354, "DATA")
            writer.write(payload)
            code, text = await read_reply(reader)
            if code // 100 != 2:
                errors.append(text.decode(errors="replace").strip())
                continue
            latencies.append(time.perf_counter() - start)
        writer.write(b"QUIT\r\n")
        await read_reply(reader)
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except ConnectionError:
            pass


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, -(-len(sorted_values) * p // 100))
    return sorted_values[int(rank) - 1]


async def run(host: str, port: int, messages: int, connections: int, size: int) -> dict[str, Any]:
    body = make_message(size)
    payload = body + b".\r\n"  # the content has no line starting with "."; it ends with CRLF
    queue = list(range(messages))
    latencies: list[float] = []
    errors: list[str] = []
    start = time.perf_counter()
    results = await asyncio.gather(
        *(connection(host, port, queue, payload, latencies, errors) for _ in range(connections)),
        return_exceptions=True)
    elapsed = time.perf_counter() - start
    errors += [f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)]
    latencies.sort()
    return {
        "messages": len(latencies), "errors": len(errors), "first_error": errors[0] if errors else "",
        "elapsed_s": round(elapsed, 4), "msgs_per_s": round(len(latencies) / elapsed, 1),
        "message_bytes": len(body),
        "p50_ms": round(percentile(latencies, 50) * 1000, 3),
        "p90_ms": round(percentile(latencies, 90) * 1000, 3),
        "p99_ms": round(percentile(latencies, 99) * 1000, 3),
        "max_ms": round(latencies[-1] * 1000, 3) if latencies else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--size", type=int, default=4096, help="payload bytes after the headers")
    args = parser.parse_args()
    try:
        import uvloop  # a cheaper client leaves more of the machine to the server under test
        factory = uvloop.new_event_loop
    except ImportError:
        factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        result = runner.run(run(args.host, args.port, args.messages, args.connections, args.size))
    print(json.dumps(result))
    sys.exit(1 if result["errors"] or result["messages"] != args.messages else 0)


if __name__ == "__main__":
    main()
