"""The PROXY protocol (``[server] proxy_protocol``, ``trusted_proxies``): behind a load balancer
the session, the envelope's ``Client``, the ``Received:`` header, connection limits and the DNSBL
see the real client's address. HAProxy (``send-proxy-v2``) is the real load balancer here."""

from __future__ import annotations

import re
import socket
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from conftest import dnsmasq_serving, free_port, require, wait_for_port, wait_until
from mailrelay.config.loader import ConfigError
from smtpwire import Wire

PROXY_V1 = b"PROXY TCP4 203.0.113.9 127.0.0.1 1234 25\r\n"
MESSAGE = b"Subject: via a proxy\r\n\r\nhi\r\n."


def _send_message(wire: Wire) -> str:
    """EHLO, one message; the DATA reply's text."""
    assert wire.cmd("EHLO client.test")[0] == 250
    assert wire.cmd("MAIL FROM:<a@example.test>")[0] == 250
    assert wire.cmd("RCPT TO:<b@example.test>")[0] == 250
    assert wire.cmd("DATA")[0] == 354
    code, text = wire.cmd(MESSAGE)
    assert code == 250, text
    return text


def _proxied(inprocess_relay, **server):
    return inprocess_relay(config={"server": {"proxy_protocol": True, **server},
                                   "smtp": {"remote_clients": True}})


# ---------------------------------------------------------------- PROXY v1, sent by hand
def test_a_v1_header_gives_the_envelope_and_received_header_the_real_client(inprocess_relay):
    relay = _proxied(inprocess_relay)
    with Wire(relay.port) as wire:
        wire.send(PROXY_V1)
        assert wire.reply()[0] == 220
        message_id = _send_message(wire).split()[-1]
    assert relay.spool.read_envelope(message_id).client == "203.0.113.9"
    received = relay.spool.read_content(message_id).split(b"\r\n")[0]
    assert received.startswith(b"Received: from client.test ([203.0.113.9]) by relay.test")


def test_the_real_client_is_remote_so_remote_clients_rules_apply(inprocess_relay):
    relay = inprocess_relay(config={"server": {"proxy_protocol": True}})  # no --remote-clients
    with Wire(relay.port) as wire:
        wire.send(PROXY_V1)
        assert wire.reply() == (554, "5.7.1 Connections from remote addresses are not accepted here")


def test_connection_limits_count_the_real_client(inprocess_relay):
    relay = inprocess_relay(config={"server": {"proxy_protocol": True},
                                    "smtp": {"remote_clients": True, "max_connections_per_client": 1}})
    first = Wire(relay.port)
    first.send(PROXY_V1)
    assert first.reply()[0] == 220
    with Wire(relay.port) as other:  # another client through the same proxy
        other.send(b"PROXY TCP4 198.51.100.7 127.0.0.1 1235 25\r\n")
        assert other.reply()[0] == 220
    with Wire(relay.port) as again:
        again.send(PROXY_V1)
        assert again.reply() == (421, "4.7.0 Too many connections from your address, try again later")
    first.close()


def test_a_connection_from_outside_trusted_proxies_is_refused(inprocess_relay):
    relay = _proxied(inprocess_relay, trusted_proxies=["10.0.0.0/8"])
    with Wire(relay.port) as wire:
        assert wire.reply() == (421, "4.7.0 Connections are accepted only through a trusted proxy")
        assert wire.closed()


def test_a_trusted_connection_without_a_header_gets_no_greeting(inprocess_relay):
    relay = _proxied(inprocess_relay)
    with Wire(relay.port) as wire:
        wire.send(b"EHLO client.test\r\n")
        assert wire.closed()


def test_trusted_proxies_must_be_addresses_or_networks(inprocess_relay):
    with pytest.raises(ConfigError, match=r"trusted_proxies.*'proxy\.example' is not an address"):
        _proxied(inprocess_relay, trusted_proxies=["proxy.example"])


# ---------------------------------------------------------------- the DNSBL sees the PROXY address
@pytest.fixture(scope="module")
def block_list(tmp_path_factory) -> Iterator[str]:
    """dnsmasq serving zen.test, which lists 203.0.113.9 and 127.0.0.5; ``host:port``."""
    workdir = tmp_path_factory.mktemp("proxy-dnsbl")
    port = free_port()
    records = ["--host-record=9.113.0.203.zen.test,127.0.0.2", "--txt-record=9.113.0.203.zen.test,Listed for tests",
               "--host-record=5.0.0.127.zen.test,127.0.0.2", "--txt-record=5.0.0.127.zen.test,Listed for tests"]
    with dnsmasq_serving(workdir, port, records, probe="9.113.0.203.zen.test"):
        yield f"127.0.0.1:{port}"


def test_the_dnsbl_looks_up_the_address_from_a_v1_header(inprocess_relay, block_list):
    relay = inprocess_relay(enable=["dnsbl"], config={
        "server": {"proxy_protocol": True}, "smtp": {"remote_clients": True},
        "dnsbl": {"servers": ["zen.test"], "dns_server": block_list, "allow": []}})
    with Wire(relay.port) as wire:
        wire.send(PROXY_V1)
        assert wire.reply() == \
            (554, "5.7.1 Client address [203.0.113.9] blocked using zen.test: Listed for tests")
    with Wire(relay.port) as wire:  # an unlisted client through the same proxy
        wire.send(b"PROXY TCP4 198.51.100.7 127.0.0.1 1235 25\r\n")
        assert wire.reply()[0] == 220


# ---------------------------------------------------------------- HAProxy with send-proxy-v2
@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator:
    """Factory: HAProxy in the foreground, forwarding a free port to ``backend_port`` with a
    PROXY v2 header; returns the frontend port."""
    binary = require("haproxy")
    procs: list[subprocess.Popen] = []

    def start(backend_port: int) -> int:
        port = free_port()
        config = tmp_path / f"haproxy{len(procs)}.cfg"
        config.write_text(
            "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n"
            f"frontend smtp\n  bind 127.0.0.1:{port}\n  default_backend relay\n"
            f"backend relay\n  server relay 127.0.0.1:{backend_port} send-proxy-v2\n")
        proc = subprocess.Popen([binary, "-f", str(config), "-db"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        procs.append(proc)
        wait_for_port(port, proc)
        return port

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(10)


def _wire_from(source: str, port: int) -> Wire:
    """A client connected from loopback address ``source`` (Linux routes all of 127/8 to lo)."""
    wire = Wire.__new__(Wire)
    wire.sock = socket.create_connection(("127.0.0.1", port), 10, source_address=(source, 0))
    wire.buf = b""
    return wire


def test_haproxy_send_proxy_v2_gives_the_relay_the_real_client(relay_process, haproxy, tmp_path):
    conf = tmp_path / "relay.conf"
    conf.write_text('[server]\nproxy_protocol = true\ntrusted_proxies = ["127.0.0.1"]\n')
    relay = relay_process("--config", str(conf), "--remote-clients")
    front = haproxy(relay.port)
    with _wire_from("127.0.0.5", front) as wire:
        client_port = wire.sock.getsockname()[1]
        assert wire.reply()[0] == 220
        message_id = _send_message(wire).split()[-1]
    # The relay names the client's own address and source port, and HAProxy as the proxy.
    wait_until(lambda: re.search(rf"client=127\.0\.0\.5 port={client_port} proxy=127\.0\.0\.1 PROXY v2",
                                 relay.log), what="the PROXY log line")
    envelope = (relay.spool / f"{message_id}.envelope").read_text().splitlines()
    assert "X-MailRelay-Client: 127.0.0.5" in envelope
    assert b"([127.0.0.5])" in (relay.spool / f"{message_id}.content").read_bytes().split(b"\r\n")[0]


def test_behind_haproxy_the_dnsbl_sees_the_real_client(relay_process, haproxy, block_list, tmp_path):
    conf = tmp_path / "relay.conf"
    conf.write_text('[server]\nproxy_protocol = true\n\n[dnsbl]\nallow = []\n')
    relay = relay_process("--config", str(conf), "--remote-clients", "--dnsbl", f"zen.test,1,3000,{block_list}")
    front = haproxy(relay.port)
    with _wire_from("127.0.0.5", front) as wire:
        assert wire.reply() == (554, "5.7.1 Client address [127.0.0.5] blocked using zen.test: Listed for tests")
    with _wire_from("127.0.0.6", front) as wire:  # not listed
        assert wire.reply()[0] == 220
        wire.cmd("QUIT")
