"""Forwarding through a SOCKS proxy, E-MailRelay's ``--forward-to host:port@socks-host:socks-port``,
against a real SOCKS server: Dante (``danted``) on a loopback high port, connecting out from
127.0.0.2 so the next hop can tell a proxied connection from a direct one."""

from __future__ import annotations

import smtplib
import ssl
import subprocess
from pathlib import Path

import pytest
import trustme

from conftest import free_port, require, wait_for_port, wait_until
from mailrelay_plugins.forward.routing import NextHop, RoutingError, parse_next_hop
from mailrelay_plugins.forward.socks import SocksProxy
from sinks import Sink

MSG = b"From: a@example.test\r\nTo: x@far.test\r\nSubject: via socks\r\n\r\nbody\r\n"
PROXY_SOURCE = "127.0.0.2"  # Dante's "external" address: where proxied connections come from


class Dante:
    def __init__(self, workdir: Path):
        self.port = free_port()
        self.log_path = workdir / "danted.log"
        config = workdir / "danted.conf"
        config.write_text(f"""debug: 1
logoutput: stderr
internal: 127.0.0.1 port = {self.port}
external: {PROXY_SOURCE}
clientmethod: none
socksmethod: none
user.privileged: root
user.unprivileged: nobody
client pass {{ from: 127.0.0.0/8 to: 0.0.0.0/0 log: error }}
socks pass {{ from: 127.0.0.0/8 to: 0.0.0.0/0 log: connect error }}
""")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([require("danted"), "-f", str(config), "-N", "1"], stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            wait_for_port(self.port, self.proc)
        except (RuntimeError, TimeoutError):
            self.stop()
            pytest.fail(f"danted did not start: {self.log}")

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def dante(tmp_path_factory):
    server = Dante(tmp_path_factory.mktemp("dante"))
    yield server
    server.stop()


@pytest.fixture
def peer_sink(sink):
    """Factory: a sink that also records the address each message came from (optionally STARTTLS)."""
    started = []

    def start(tls: bool = False) -> Sink:
        if not tls:
            target = sink()
        else:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            trustme.CA().issue_cert("localhost", "127.0.0.1").configure_cert(context)
            target = Sink(free_port(), tls_context=context).start()
            started.append(target)
        target.peers = []
        original = target.handler.handle_DATA

        async def record_peer(server, session, envelope):
            target.peers.append(session.peer[0])
            return await original(server, session, envelope)

        target.handler.handle_DATA = record_peer
        return target

    yield start
    for target in started:
        target.stop()


def send(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.sendmail("a@example.test", ["x@far.test"], MSG)


def test_forward_to_through_socks5_from_the_command_line(relay_process, peer_sink, dante):
    """The E-MailRelay syntax, a real relay process, STARTTLS inside the proxied connection."""
    target = peer_sink(tls=True)
    relay = relay_process("--forward-to", f"127.0.0.1:{target.port}@127.0.0.1:{dante.port}", "--client-tls-required")
    send(relay.port)
    [got] = target.wait_for(1)
    assert got.recipients == ["x@far.test"] and target.peers == [PROXY_SOURCE]
    wait_until(lambda: not list(relay.spool.glob("*.envelope*")), what="an empty spool")


def test_the_proxy_resolves_the_next_hops_name(inprocess_relay, peer_sink, dante):
    target = peer_sink()
    relay = inprocess_relay(enable=["forward"], config={
        "forward": {"to": f"localhost:{target.port}@socks5://127.0.0.1:{dante.port}"}})
    send(relay.port)
    target.wait_for(1)
    assert target.peers == [PROXY_SOURCE]
    # Dante's debug log shows the request carried a name (address type 3), which Dante resolved.
    assert f"ATYP: 3 address: localhost.{target.port}" in dante.log
    assert f"hostname localhost.{target.port} in connect-request resolved to address 127.0.0.1" in dante.log


def test_socks4a_to_an_address(inprocess_relay, peer_sink, dante):
    target = peer_sink()
    relay = inprocess_relay(enable=["forward"], config={
        "forward": {"to": f"127.0.0.1:{target.port}@socks4a://127.0.0.1:{dante.port}"}})
    send(relay.port)
    target.wait_for(1)
    assert target.peers == [PROXY_SOURCE]


def retry_reason(relay) -> str:
    [retry] = wait_until(lambda: list(relay.spool.directory.glob("*.retry")), what="a deferred message")
    return retry.read_text()


def test_a_refusing_proxy_defers_with_the_reason(inprocess_relay, peer_sink, dante):
    """Dante has no SOCKS4a (names in SOCKS4): it refuses, and the message waits with that reason."""
    target = peer_sink()
    relay = inprocess_relay(enable=["forward"], config={
        "forward": {"to": f"localhost:{target.port}@socks4a://127.0.0.1:{dante.port}"},
        "queue": {"retry": ["1h"]}})
    send(relay.port)
    reason = retry_reason(relay)
    assert f"SOCKS proxy socks4a://127.0.0.1:{dante.port} refused to connect to localhost:{target.port}" in reason
    assert target.received == []


def test_an_unreachable_proxy_defers(inprocess_relay, peer_sink):
    target = peer_sink()
    dead = free_port()
    relay = inprocess_relay(enable=["forward"], config={
        "forward": {"to": f"127.0.0.1:{target.port}@127.0.0.1:{dead}"}, "queue": {"retry": ["1h"]}})
    send(relay.port)
    assert f"4.4.1 SOCKS proxy socks5://127.0.0.1:{dead} unreachable" in retry_reason(relay)
    assert target.received == []


@pytest.mark.parametrize("text, expected", [
    ("mail.example.com:25", NextHop("mail.example.com", 25)),
    ("example.com:smtp@localhost:9050", NextHop("example.com", 25, SocksProxy("localhost", 9050))),
    ("[2001:db8::1]:587@socks4a://[::1]:1080", NextHop("2001:db8::1", 587, SocksProxy("::1", 1080, "socks4a"))),
    ("relay.example:submission@SOCKS5://proxy", NextHop("relay.example", 587, SocksProxy("proxy", 1080))),
])
def test_next_hop_syntax(text, expected):
    assert parse_next_hop(text) == expected


@pytest.mark.parametrize("text", ["host:25@http://proxy:8080", "host:25@", "host:25@proxy:99999", "@proxy:1080",
                                  "host:port@proxy:1080"])
def test_bad_next_hops_are_refused(text):
    with pytest.raises(RoutingError):
        parse_next_hop(text)


def test_a_bad_proxy_in_the_configuration_stops_the_relay(relay_process):
    relay = relay_process("--forward-to", "127.0.0.1:25@http://127.0.0.1:3128", wait=False)
    assert relay.proc.wait(30) == 1
    assert "unknown proxy scheme 'http'" in relay.log
