"""Shared fixtures: real relays (in-process or as a `relay` subprocess) on free loopback ports."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from mailrelay_sdk.testing import RunningRelay

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 15.0,
                  host: str = "127.0.0.1") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"relay exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((host, port), 0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def wait_until(check, timeout=15.0, what="condition"):
    """Poll ``check`` until it returns something true (and return that), or fail after ``timeout``."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        result = check()
        if result:
            return result
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def submit(port: int, content: bytes, *, sender: str = "a@example.test",
           recipients: tuple[str, ...] | list[str] = ("x@far.test",), timeout: float = 60.0) -> tuple[int, str]:
    """Send one message in its own session; the reply to DATA as (code, text), (250, "") when accepted."""
    with smtplib.SMTP("127.0.0.1", port, timeout=timeout) as client:
        try:
            refused = client.sendmail(sender, list(recipients), content)
        except smtplib.SMTPDataError as e:
            return e.smtp_code, e.smtp_error.decode()
    assert not refused, f"recipients refused: {refused}"
    return 250, ""


def spooled_contents(spool_dir: Path) -> list[bytes]:
    """Contents of the messages in a spool directory, oldest first (ids end in a sequence number)."""
    paths = sorted(Path(spool_dir).glob("*.content"), key=lambda p: int(p.name.split(".")[-2]))
    return [p.read_bytes() for p in paths]


def require(program: str) -> str:
    """Path of a real component; a missing one fails loudly (CI installs them all)."""
    path = shutil.which(program)
    if path is None:
        pytest.fail(f"{program} is not installed: run .ci/run (or see README) to install test components")
    return path


class RelayProcess:
    """`relay` run as a real process, as an operator would."""

    def __init__(self, args: list[str], spool: Path, port: int, log: Path, env: dict[str, str] | None):
        self.spool, self.port, self.log_path = spool, port, log
        self._log = open(log, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "mailrelay", *args], stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env={**os.environ, **(env or {})})

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def relay_process(tmp_path: Path) -> Iterator[Callable[..., RelayProcess]]:
    """Factory: start `python -m mailrelay --no-daemon ...` on a free port; stopped at teardown."""
    started: list[RelayProcess] = []

    def start(*extra: str, spool: Path | None = None, port: int | None = None, wait: bool = True,
              env: dict[str, str] | None = None) -> RelayProcess:
        spool = spool or tmp_path / f"spool{len(started)}"
        port = port or free_port()
        args = ["--no-daemon", "--log", "--no-syslog", "--port", str(port), "--spool-dir", str(spool),
                "--domain", "relay.test", *extra]
        relay = RelayProcess(args, spool, port, tmp_path / f"relay{len(started)}.log", env)
        started.append(relay)
        if wait:
            wait_for_port(port, relay.proc)
        return relay

    yield start
    for relay in started:
        relay.stop()


@pytest.fixture
def sink():
    """Factory: a real SMTP server (tests/sinks.py) that records what it is sent; stopped at teardown."""
    from sinks import Behaviour, Sink
    servers: list[Sink] = []

    def start(behaviour: Behaviour | None = None, port: int | None = None) -> Sink:
        server = Sink(port or free_port(), behaviour).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def inprocess_relay(tmp_path: Path) -> Iterator[Callable[..., RunningRelay]]:
    """Factory: an in-process relay with the given plugin objects registered."""
    running: list[RunningRelay] = []

    def start(plugins: dict | None = None, config: dict | None = None,
              enable: list[str] | None = None) -> RunningRelay:
        relay = RunningRelay(tmp_path / f"spool{len(running)}", plugins=plugins, config=config,
                             enable=enable)
        running.append(relay)
        return relay.start()

    yield start
    for relay in running:
        relay.stop()


@contextlib.contextmanager
def dnsmasq_serving(workdir: Path, port: int, records: list[str], *, probe: str, options: list[str] = (),
                    log: Path | None = None) -> Iterator[subprocess.Popen]:
    """A real dnsmasq on 127.0.0.1:``port`` answering for ``.test`` from ``records`` (its options),
    running until the block ends; ready once the A record of ``probe`` resolves."""
    dnsmasq = require("dnsmasq")
    output = open(log, "ab") if log is not None else subprocess.DEVNULL
    proc = subprocess.Popen([dnsmasq, "-k", "-C", "/dev/null", f"--port={port}", "--listen-address=127.0.0.1",
                             "--bind-interfaces", "--no-resolv", "--no-hosts", "--local=/test/", "--user=root",
                             f"--pid-file={workdir}/dnsmasq.pid", *options, *records],
                            stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    import dns.resolver

    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers, resolver.port, resolver.lifetime = ["127.0.0.1"], port, 0.5
    end = time.monotonic() + 15
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"dnsmasq exited with {proc.returncode}"
                            + (f": {log.read_text()}" if log is not None else ""))
            try:
                resolver.resolve(probe, "A")
                break
            except Exception:
                if time.monotonic() > end:
                    pytest.fail("dnsmasq did not answer within 15 s")
                time.sleep(0.05)
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)
        if log is not None:
            output.close()  # type: ignore[union-attr]


@pytest.fixture(scope="session")
def dns_server(tmp_path_factory) -> Iterator[tuple[str, int]]:
    """A real DNS server (dnsmasq) on a loopback high port with test zones under .test."""
    workdir = tmp_path_factory.mktemp("dnsmasq")
    port = free_port()
    records = ["--mx-host=example.test,mx1.example.test,10", "--mx-host=example.test,mx2.example.test,20",
               "--host-record=mx1.example.test,127.0.0.1", "--host-record=mx2.example.test,127.0.0.1",
               "--host-record=nomx.test,127.0.0.1",
               # MX routing (tests/test_mx.py); dnsmasq answers in a fixed order, the reverse of these options
               "--mx-host=equal.test,mxa.equal.test,10", "--mx-host=equal.test,mxb.equal.test,10",
               "--mx-host=equal.test,mxc.equal.test,20", "--host-record=mxa.equal.test,127.0.0.11",
               "--host-record=mxb.equal.test,127.0.0.12", "--host-record=mxc.equal.test,127.0.0.13",
               "--mx-host=dual.test,mx.dual.test,10", "--host-record=mx.dual.test,127.0.0.21,::21",
               "--host-record=mx.dual.test,127.0.0.22,::22", "--host-record=mx.dual.test,::23",
               "--host-record=v6only.test,::1",
               "--mx-host=nullmx.test,.,0",
               "--mx-host=mixednull.test,.,0", "--mx-host=mixednull.test,mx1.example.test,10",
               "--mx-host=noaddr.test,ghost.noaddr.test,10", "--mx-host=noaddr.test,txt.noaddr.test,20",
               "--txt-record=txt.noaddr.test,no address records here",
               "--mx-host=partial.test,ghost.partial.test,5", "--mx-host=partial.test,mx2.example.test,10",
               "--txt-record=txtonly.test,neither MX nor address records",
               "--mx-host=slowmx.test,mx.timeout.test,5", "--mx-host=slowmx.test,mx1.example.test,10",
               "--mx-host=slowonly.test,mx.timeout.test,10", "--mx-host=slowonly.test,ghost.slowonly.test,20",
               "--mx-host=twice.test,mx1.example.test,30", "--mx-host=twice.test,mx1.example.test,10",
               "--mx-host=twice.test,mx2.example.test,20",
               "--mx-host=xn--bcher-kva.test,mx1.example.test,10", "--host-record=xn--strae-oqa.test,127.0.0.31",
               "--server=/timeout.test/127.0.0.1#9"]  # names under timeout.test never get an answer
    with dnsmasq_serving(workdir, port, records, probe="mx1.example.test", options=["--no-negcache"],
                         log=workdir / "dnsmasq.log"):
        yield "127.0.0.1", port


@pytest.fixture(scope="session")
def dns_servfail() -> Iterator[tuple[str, int]]:
    """A DNS server on a loopback UDP port that answers every query with SERVFAIL at once."""
    import threading

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.1)  # how soon the thread notices the end of the session
    stopping = threading.Event()

    def serve() -> None:
        while not stopping.is_set():
            try:
                query, peer = sock.recvfrom(65535)
            except TimeoutError:
                continue
            if len(query) >= 12:  # same ID, opcode, RD and question; QR, RA and RCODE 2 set
                flags = bytes(((query[2] | 0x80) & 0xF9, 0x82))
                sock.sendto(query[:2] + flags + query[4:6] + bytes(6) + query[12:], peer)

    thread = threading.Thread(target=serve, name="dns-servfail", daemon=True)
    thread.start()
    yield sock.getsockname()
    stopping.set()
    thread.join()
    sock.close()
