"""Scale-out: several relays, each with its own spool, behind a real HAProxy running the
production configuration (deploy/haproxy.cfg) with PROXY v2. Mail spreads across the relays,
each ``Received:`` header names the client's own address, and a stopped relay loses no client."""

from __future__ import annotations

import re
import smtplib
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from conftest import ROOT, free_port, require, wait_for_port, wait_until

PRODUCTION = ROOT / "deploy" / "haproxy.cfg"
CLIENTS = ("127.0.0.2", "127.0.0.3")  # client addresses the test controls (all of 127/8 is loopback)


def for_this_test(config: str, front: int, relays: list[int]) -> str:
    """deploy/haproxy.cfg with loopback addresses: the frontends on free ports, the servers the
    relays under test. Everything else (balancing, PROXY v2, health checks, timeouts) is as shipped."""
    bind_lines = re.findall(r"^\s*bind :\d+$", config, re.M)
    assert bind_lines == ["    bind :25", "    bind :587"], bind_lines
    config = config.replace("    bind :25\n", f"    bind 127.0.0.1:{front}\n")
    config = config.replace("    bind :587\n", f"    bind 127.0.0.1:{free_port()}\n")
    for number, port in enumerate(relays, 1):
        config, replaced = re.subn(rf"^(    server relay{number}) 10\.0\.0\.1{number}:\d+$", rf"\1 127.0.0.1:{port}",
                                   config, flags=re.M)
        assert replaced == 2, f"relay{number}: {replaced} server lines"
    assert not re.search(r"^\s*server .* 10\.", config, re.M)
    return config


@pytest.fixture
def relays(relay_process, tmp_path: Path) -> list:
    """Two relays as deploy/haproxy.cfg asks: the PROXY protocol on, HAProxy trusted."""
    conf = tmp_path / "relay.conf"
    conf.write_text('[server]\nproxy_protocol = true\ntrusted_proxies = ["127.0.0.1"]\n')
    return [relay_process("--config", str(conf)) for _ in range(2)]


@pytest.fixture
def haproxy_front(relays, tmp_path: Path) -> Iterator[int]:
    binary = require("haproxy")
    front = free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(for_this_test(PRODUCTION.read_text(), front, [r.port for r in relays]))
    log = tmp_path / "haproxy.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([binary, "-f", str(config), "-db"], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    try:
        wait_for_port(front, proc)
        yield front
    finally:
        proc.terminate()
        proc.wait(10)


def send(front: int, client: str, subject: str) -> str:
    """One message from ``client`` through HAProxy; the spool id from the 250 reply."""
    with smtplib.SMTP("127.0.0.1", front, local_hostname="client.test", timeout=30,
                      source_address=(client, 0)) as smtp:
        smtp.ehlo()
        smtp.mail("a@example.test")
        smtp.rcpt("b@example.test")
        code, text = smtp.data(f"Subject: {subject}\r\n\r\nhello\r\n".encode())
    assert code == 250, text
    return text.decode().split()[-1]


def test_the_production_config_is_valid():
    result = subprocess.run([require("haproxy"), "-c", "-f", str(PRODUCTION)], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Configuration file is valid" in result.stdout


def test_mail_spreads_over_both_relays_with_the_real_client_address(relays, haproxy_front):
    sent = {f"message {i}": CLIENTS[i % 2] for i in range(20)}
    for subject, client in sent.items():
        send(haproxy_front, client, subject)
    seen: dict[str, str] = {}
    per_relay = []
    for relay in relays:
        contents = [p.read_bytes() for p in relay.spool.glob("*.content")]
        per_relay.append(len(contents))
        for content in contents:
            received = content.split(b"\r\n")[0].decode()
            subject = re.search(r"^Subject: ([^\r\n]*)", content.decode(), re.M).group(1)
            client = re.match(r"Received: from client\.test \(\[([\d.]+)\]\) by relay\.test ", received).group(1)
            seen[subject] = client
        for envelope in relay.spool.glob("*.envelope"):
            assert re.search(r"^X-MailRelay-Client: 127\.0\.0\.[23]$", envelope.read_text(), re.M)
    assert seen == sent  # every message once, each naming the address it really came from
    assert sum(per_relay) == 20 and min(per_relay) >= 5  # roundrobin: about half each


def test_a_stopped_relay_loses_no_client(relays, haproxy_front):
    first, second = relays
    assert second.stop() == 0
    ids = [send(haproxy_front, CLIENTS[0], f"after the stop {i}") for i in range(4)]
    assert all((first.spool / f"{message_id}.content").exists() for message_id in ids)


def test_haproxy_health_checks_pass_through_the_proxy_protocol(relays, haproxy_front):
    # check-send-proxy: each check starts with a v2 LOCAL header, then EHLO; the relay answers 250.
    for relay in relays:
        wait_until(lambda: "no client address in the PROXY header" in relay.log, timeout=20,
                   what="a health check")
    assert "refused" not in relays[0].log + relays[1].log
