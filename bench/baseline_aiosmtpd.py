"""The baseline for bench/accept.py: bare aiosmtpd, one file per message, no fsync.

This is what "accept a message and put it on disk" costs with the same SMTP library and the same
event loop the relay uses, and nothing else: no hooks, no envelope, no group commit, no flush.
It runs as its own process so the benchmark measures it exactly as it measures the relay.

    python bench/baseline_aiosmtpd.py --port PORT --dir DIR

Prints ``ready 127.0.0.1:PORT`` once listening; SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session


class FileHandler:
    """Accept every message and write it to ``<dir>/<n>.eml`` (open, write, close)."""

    def __init__(self, directory: str):
        self.directory = directory
        self._seq = itertools.count(1)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        path = os.path.join(self.directory, f"{next(self._seq)}.eml")
        with open(path, "wb") as f:
            f.write(content)
        return "250 2.0.0 OK"


def loop_factory(choice: str) -> Any:
    """The relay uses uvloop when it is installed; the baseline follows the same rule."""
    if choice in ("auto", "uvloop"):
        try:
            import uvloop
            return uvloop.new_event_loop
        except ImportError:
            if choice == "uvloop":
                raise
    return asyncio.new_event_loop


async def serve(host: str, port: int, directory: str) -> None:
    handler = FileHandler(directory)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(handler, hostname="baseline.test", loop=loop),
                                      host, port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"ready {host}:{port}", flush=True)
    await stop.wait()
    server.close()
    await server.wait_closed()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dir", required=True, help="directory for the .eml files (created if missing)")
    parser.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto")
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    with asyncio.Runner(loop_factory=loop_factory(args.loop)) as runner:
        runner.run(serve(args.host, args.port, args.dir))


if __name__ == "__main__":
    main()
