"""Without --remote-clients only loopback clients are served (E-MailRelay's default).

A real remote client: a network namespace of the test's own, joined to this host by a veth pair,
runs smtplib against the relay.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Iterator

import pytest

from conftest import require, wait_for_port
from mailrelay.spool import Spool

CLIENT = """
import smtplib, sys
try:
    with smtplib.SMTP(sys.argv[1], int(sys.argv[2]), timeout=10) as c:
        c.sendmail("far@remote.test", [sys.argv[3]], b"Subject: from afar\\r\\n\\r\\nhi\\r\\n")
    print("sent")
except smtplib.SMTPConnectError as e:
    print("refused", e.smtp_code, e.smtp_error.decode())
except smtplib.SMTPRecipientsRefused as e:
    code, text = next(iter(e.recipients.values()))
    print("rejected", code, text.decode())
"""


@pytest.fixture
def remote_host() -> Iterator[tuple[str, str, str]]:
    """(namespace, host-side address, client address) for a client host of our own."""
    ip = require("ip")
    tag = f"{os.getpid() % 10000}"
    ns, host_if, peer_if = f"mrtest{tag}", f"mrh{tag}", f"mrp{tag}"
    subnet = 200 + os.getpid() % 50
    host_addr, peer_addr = f"10.234.{subnet}.1", f"10.234.{subnet}.2"
    steps = [[ip, "netns", "add", ns],
             [ip, "link", "add", host_if, "type", "veth", "peer", "name", peer_if],
             [ip, "link", "set", peer_if, "netns", ns],
             [ip, "addr", "add", f"{host_addr}/30", "dev", host_if],
             [ip, "link", "set", host_if, "up"],
             [ip, "netns", "exec", ns, ip, "addr", "add", f"{peer_addr}/30", "dev", peer_if],
             [ip, "netns", "exec", ns, ip, "link", "set", peer_if, "up"],
             [ip, "netns", "exec", ns, ip, "link", "set", "lo", "up"]]
    try:
        for step in steps:
            result = subprocess.run(step, capture_output=True, text=True)
            if result.returncode != 0:
                pytest.fail(f"cannot build the test network ({' '.join(step)}): {result.stderr}")
        yield ns, host_addr, peer_addr
    finally:
        subprocess.run([ip, "link", "del", host_if], capture_output=True)
        subprocess.run([ip, "netns", "del", ns], capture_output=True)


def send_from(ns: str, host: str, port: int, recipient: str = "b@relay.test") -> str:
    result = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", CLIENT, host, str(port), recipient],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_remote_client_is_refused_by_default(relay_process, remote_host):
    ns, host_addr, _ = remote_host
    relay = relay_process("--interface", f"127.0.0.1,{host_addr}")
    assert send_from(ns, host_addr, relay.port).startswith("refused 554 5.7.1")
    assert Spool(relay.spool).ids() == []
    assert "remote clients are not enabled" in relay.log


def test_remote_client_is_served_with_remote_clients(relay_process, remote_host):
    ns, host_addr, peer_addr = remote_host
    relay = relay_process("--remote-clients", "--interface", host_addr, wait=False)
    wait_for_port(relay.port, relay.proc, host=host_addr)
    assert send_from(ns, host_addr, relay.port) == "sent"
    spool = Spool(relay.spool)
    [message_id] = spool.ids()
    assert spool.read_envelope(message_id).client == peer_addr
    assert f"([{peer_addr}])".encode() in spool.read_content(message_id)


def test_remote_clients_cannot_relay_by_default(relay_process, remote_host):
    # --remote-clients brings relay control: an outsider may mail the local domain, nothing else.
    ns, host_addr, _ = remote_host
    relay = relay_process("--remote-clients", "--interface", host_addr, wait=False)
    wait_for_port(relay.port, relay.proc, host=host_addr)
    assert send_from(ns, host_addr, relay.port, "victim@elsewhere.test").startswith("rejected 550 5.7.1")
    assert Spool(relay.spool).ids() == []


def test_default_interface_is_loopback_only(relay_process, remote_host):
    ns, host_addr, _ = remote_host
    relay = relay_process()
    result = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c",
                             f"import socket; socket.create_connection(('{host_addr}', {relay.port}), 3)"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and "refused" in result.stderr.lower()
