"""A real SpamAssassin spamd for the spam filter tests (Debian's spamassassin and spamd packages).

``spamd`` (session scope) is shared and never stopped by a test; ``spamd_factory`` starts private
instances a test may stop. Each listens on a loopback high port and on a unix socket, with ``-L``
(no network tests: answers come from the local rules alone, in well under a second).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import aiospamc
import pytest

from conftest import free_port, require

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


@dataclass
class Spamd:
    """One running spamd: ``address`` for ``spam:`` specs, ``socket`` for the unix socket form."""

    proc: subprocess.Popen
    port: int
    socket: Path
    log_path: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """Stop spamd and its children (SIGTERM to the parent takes them down)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_spamd(workdir: Path, timeout: float = 30.0) -> Spamd:
    """Start spamd in the foreground and wait until it answers PING."""
    binary = require("spamd")
    workdir.mkdir(parents=True, exist_ok=True)
    home = workdir / "home"
    home.mkdir(exist_ok=True)
    home.chmod(0o777)  # spamd's helper runs as nobody and needs a writable HOME
    port = free_port()
    sock = workdir / "spamd.sock"
    if len(str(sock)) > 100:  # a unix socket path has ~108 bytes
        sock = Path(tempfile.mkdtemp(prefix="spamd")) / "spamd.sock"
    log_path = workdir / "spamd.log"
    args = [binary, "-L", "-x", f"--listen=127.0.0.1:{port}", f"--listen={sock}", "-H", str(home),
            "--min-children=1", "--max-children=2", "-s", "stderr"]
    if os.geteuid() == 0:
        args += ["-u", "nobody"]  # spamd refuses to keep root
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    spamd = Spamd(proc, port, sock, log_path)
    end = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"spamd exited with {proc.returncode}:\n{spamd.log}")
        if _answers(port):
            return spamd
        if time.monotonic() > end:
            spamd.stop()
            pytest.fail(f"spamd did not answer PING within {timeout:g}s:\n{spamd.log}")
        time.sleep(0.05)


def _answers(port: int) -> bool:
    async def ping() -> bool:
        response = await aiospamc.ping(host="127.0.0.1", port=port, timeout=aiospamc.Timeout(total=2))
        return response.message == "PONG"

    try:
        return asyncio.run(ping())
    except Exception:  # not listening yet
        return False


@pytest.fixture(scope="session")
def spamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Spamd]:
    """The shared spamd; tests must not stop it."""
    server = start_spamd(tmp_path_factory.mktemp("spamd"))
    yield server
    server.stop()


@pytest.fixture
def spamd_factory(tmp_path: Path) -> Iterator[Callable[[], Spamd]]:
    """Start a private spamd that the test may stop; stopped at teardown otherwise."""
    started: list[Spamd] = []

    def start() -> Spamd:
        server = start_spamd(tmp_path / f"spamd{len(started)}")
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
