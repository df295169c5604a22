"""DNS block lists (``--dnsbl``, ``[dnsbl]``): a real DNS server (dnsmasq) serves test lists.

Clients connect from 127.0.0.1 (and ::1), which the lists below name; ``allow = []`` turns off
the default exemption of loopback and private networks so that they are looked up at all.
"""

from __future__ import annotations

import ipaddress
import itertools
import smtplib
import socket
import time
from pathlib import Path
from typing import Iterator

import dns.resolver
import pytest

from conftest import dnsmasq_serving, free_port, wait_until
from mailrelay.config.loader import ConfigError
from mailrelay_plugins.dnsbl.lookup import AnswerCache, ListAnswer, client_address, query_name
from mailrelay_plugins.dnsbl.settings import DnsblSettings, parse_spec

LOOPBACK_V6 = query_name(ipaddress.ip_address("::1"), "zen.test")[: -len(".zen.test.")]
ZEN_TEXT = "Listed by zen.test see https://zen.test/q?ip=127.0.0.1"
MESSAGE = b"Subject: hello\r\n\r\nhi\r\n"


class Lists:
    """The test DNS server and its query log."""

    def __init__(self, address: str, port: int, log: Path):
        self.address, self.port, self.log = address, port, log
        self._markers = itertools.count()

    @property
    def server(self) -> str:
        return f"{self.address}:{self.port}"

    def queries(self, qtype: str, name: str) -> int:
        """Queries dnsmasq has logged for ``name``, once everything asked so far is logged."""
        marker = f"marker{next(self._markers)}.clean.test"
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers, resolver.port, resolver.lifetime = [self.address], self.port, 2
        with pytest.raises(dns.resolver.NXDOMAIN):
            resolver.resolve(marker, "A")
        wait_until(lambda: f" {marker} " in self.log.read_text(), what="the query log")
        return self.log.read_text().count(f"query[{qtype}] {name} from")


@pytest.fixture(scope="module")
def blackhole() -> Iterator[tuple[str, int]]:
    """A UDP socket that receives DNS queries and never answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    yield sock.getsockname()
    sock.close()


@pytest.fixture(scope="module")
def lists(tmp_path_factory, blackhole, dns_servfail) -> Iterator[Lists]:
    workdir = tmp_path_factory.mktemp("dnsbl-dns")
    port = free_port()
    records = [
        "--host-record=1.0.0.127.zen.test,127.0.0.2", f"--txt-record=1.0.0.127.zen.test,{ZEN_TEXT}",
        f"--host-record={LOOPBACK_V6}.zen.test,127.0.0.2",
        f"--txt-record={LOOPBACK_V6}.zen.test,Listed by zen.test (IPv6)",
        "--host-record=1.0.0.127.second.test,127.0.0.4", "--txt-record=1.0.0.127.second.test,Listed (XBL)",
        "--host-record=1.0.0.127.notxt.test,127.0.0.3",
        "--host-record=1.0.0.127.errors.test,127.255.255.254",   # Spamhaus: "public resolver refused"
        "--host-record=1.0.0.127.outside.test,192.0.2.1",
        f"--server=/servfail.test/{dns_servfail[0]}#{dns_servfail[1]}",
        f"--server=/silent.test/{blackhole[0]}#{blackhole[1]}",
        # clean.test: no records, so NXDOMAIN (not listed) for every address
    ]
    log = workdir / "queries.log"
    with dnsmasq_serving(workdir, port, records, probe="1.0.0.127.zen.test",
                         options=["--local-ttl=300", "--log-queries", f"--log-facility={log}"]):
        yield Lists("127.0.0.1", port, log)


@pytest.fixture
def dnsbl_relay(inprocess_relay, lists):
    """An in-process relay with the dnsbl plugin; loopback is looked up unless ``allow`` is given."""
    def start(smtp: dict | None = None, **dnsbl):
        config: dict = {"dnsbl": {"dns_server": lists.server, "allow": [], "timeout": 3, **dnsbl}}
        if smtp:
            config["smtp"] = smtp
        return inprocess_relay(enable=["dnsbl"], config=config)
    return start


def greeting(port: int, host: str = "127.0.0.1") -> str:
    """The server's first reply (then QUIT when it was a 220)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.settimeout(15)
        sock.connect((host, port))
        reply = b""
        while not reply.endswith(b"\r\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
        if reply.startswith(b"220"):
            sock.sendall(b"QUIT\r\n")
    return reply.decode().strip()


# ---------------------------------------------------------------- refusing at connect
def test_a_listed_client_gets_554_with_the_lists_text(relay_process, lists, tmp_path):
    conf = tmp_path / "relay.conf"
    conf.write_text("[dnsbl]\nallow = []\n")
    relay = relay_process("--config", str(conf), "--dnsbl", f"zen.test,1,3000,{lists.server}")
    with pytest.raises(smtplib.SMTPConnectError) as refused:
        smtplib.SMTP("127.0.0.1", relay.port, timeout=15)
    assert refused.value.smtp_code == 554
    assert refused.value.smtp_error.decode() == \
        f"5.7.1 Client address [127.0.0.1] blocked using zen.test: {ZEN_TEXT}"
    wait_until(lambda: "dnsbl listed=zen.test=127.0.0.2 action=reject" in relay.log, what="the log line")
    assert not list(relay.spool.glob("*.content"))


def test_a_list_without_txt_still_refuses_with_a_plain_text(dnsbl_relay):
    relay = dnsbl_relay(servers=["notxt.test"])
    assert greeting(relay.port) == "554 5.7.1 Client address [127.0.0.1] blocked using notxt.test"


def test_ipv6_clients_are_looked_up_by_nibbles(dnsbl_relay):
    port = free_port()
    relay = dnsbl_relay(servers=["zen.test"], smtp={"port": port, "interface": ["127.0.0.1", "::1"]})
    assert relay.port == port
    assert greeting(port, "::1") == \
        "554 5.7.1 Client address [::1] blocked using zen.test: Listed by zen.test (IPv6)"


def test_the_threshold_counts_lists_that_agree(dnsbl_relay):
    one_of_two = dnsbl_relay(servers=["zen.test", "clean.test"], threshold=2)
    assert greeting(one_of_two.port).startswith("220 ")
    two_of_two = dnsbl_relay(servers=["clean.test", "second.test", "zen.test"], threshold=2)
    # The first list in the configured order that names the client explains the refusal.
    assert greeting(two_of_two.port) == \
        "554 5.7.1 Client address [127.0.0.1] blocked using second.test: Listed (XBL)"


def test_threshold_zero_only_logs(dnsbl_relay, caplog):
    caplog.set_level("INFO", logger="mailrelay.dnsbl")
    relay = dnsbl_relay(servers=["zen.test"], threshold=0)
    assert greeting(relay.port).startswith("220 ")
    assert "listed=zen.test=127.0.0.2 count=1 threshold=0 action=none" in caplog.text


def test_error_answers_and_answers_outside_127_8_do_not_count(dnsbl_relay, caplog):
    relay = dnsbl_relay(servers=["errors.test", "outside.test"])
    assert greeting(relay.port).startswith("220 ")
    assert "dnsbl=errors.test answered 127.255.255.254, an error signal" in caplog.text
    assert "dnsbl=outside.test answered 192.0.2.1, an error signal" in caplog.text


# ---------------------------------------------------------------- who is not looked up
def test_loopback_and_private_networks_are_not_looked_up_by_default(inprocess_relay, lists, caplog):
    before = lists.queries("A", "1.0.0.127.zen.test")
    relay = inprocess_relay(enable=["dnsbl"], config={"dnsbl": {"servers": ["zen.test"],
                                                               "dns_server": lists.server}})
    assert greeting(relay.port).startswith("220 ")
    assert lists.queries("A", "1.0.0.127.zen.test") == before
    assert "no client will be looked up" in caplog.text  # loopback only, and loopback exempt


def test_an_allow_list_exempts_its_networks(dnsbl_relay):
    relay = dnsbl_relay(servers=["zen.test"], allow=["192.0.2.0/24", "127.0.0.1"])
    assert greeting(relay.port).startswith("220 ")


# ---------------------------------------------------------------- slow and broken DNS
def test_a_silent_dns_server_fails_open_after_the_timeout(dnsbl_relay, blackhole, caplog):
    relay = dnsbl_relay(servers=["zen.test", "second.test"], timeout=0.5,
                        dns_server=f"{blackhole[0]}:{blackhole[1]}")
    started = time.monotonic()
    assert greeting(relay.port).startswith("220 ")
    assert 0.4 < time.monotonic() - started < 3
    assert "dnsbl=zen.test no answer within 0.5s; not counted" in caplog.text
    assert "dnsbl=second.test no answer within 0.5s; not counted" in caplog.text


def test_a_negative_timeout_fails_closed(relay_process, lists, tmp_path):
    conf = tmp_path / "relay.conf"
    conf.write_text("[dnsbl]\nallow = []\n")
    relay = relay_process("--config", str(conf), "--dnsbl", f"silent.test,1,-500,{lists.server}")
    assert greeting(relay.port) == "421 4.7.0 Block list lookups did not finish, try again later"


def test_enough_listings_decide_without_waiting_for_a_silent_list(dnsbl_relay):
    relay = dnsbl_relay(servers=["silent.test", "zen.test"], timeout=10)
    started = time.monotonic()
    assert greeting(relay.port).startswith("554 5.7.1 Client address [127.0.0.1] blocked using zen.test")
    assert time.monotonic() - started < 3


def test_a_failing_list_does_not_count(dnsbl_relay, caplog):
    relay = dnsbl_relay(servers=["servfail.test", "zen.test"], threshold=2)
    assert greeting(relay.port).startswith("220 ")
    assert "dnsbl=servfail.test server failure" in caplog.text


# ---------------------------------------------------------------- cache
def test_answers_are_cached_for_their_ttl(dnsbl_relay, lists):
    a_before, txt_before = lists.queries("A", "1.0.0.127.zen.test"), lists.queries("TXT", "1.0.0.127.zen.test")
    clean_before = lists.queries("A", "1.0.0.127.clean.test")
    relay = dnsbl_relay(servers=["zen.test", "clean.test"], threshold=2)
    other = dnsbl_relay(servers=["zen.test"])
    for _ in range(3):
        assert greeting(relay.port).startswith("220 ")
        assert greeting(other.port).startswith("554 ")
    # One query per relay and list: later connections are answered from the cache (TTL 300 s),
    # "not listed" (NXDOMAIN) included; the TXT record is asked for only by the refusing relay.
    assert lists.queries("A", "1.0.0.127.zen.test") - a_before == 2
    assert lists.queries("A", "1.0.0.127.clean.test") - clean_before == 1
    assert lists.queries("TXT", "1.0.0.127.zen.test") - txt_before == 1


def test_the_cache_is_bounded_and_keeps_nothing_without_a_ttl():
    cache = AnswerCache(2)
    for n in range(3):
        cache.put((f"192.0.2.{n}", "zen.test"), ListAnswer("zen.test"), 60)
    assert len(cache) == 2 and cache.get(("192.0.2.0", "zen.test")) is None
    cache.put(("192.0.2.9", "zen.test"), ListAnswer("zen.test"), 0)
    assert cache.get(("192.0.2.9", "zen.test")) is None


# ---------------------------------------------------------------- tag mode
def test_tag_mode_accepts_and_the_message_carries_the_header(relay_process, lists, tmp_path):
    # A pipe: filter (like spam:, it reads the message in memory) sees the header before the 250.
    check = tmp_path / "needs-header"
    check.write_text("#!/bin/sh\ngrep -q '^X-DNSBL: zone=zen.test' || { echo '<<no dnsbl header>>'; exit 1; }\n")
    check.chmod(0o755)
    conf = tmp_path / "relay.conf"
    conf.write_text('[dnsbl]\nallow = []\nmode = "tag"\n')
    relay = relay_process("--config", str(conf), "--filter", f"pipe:{check}",
                          "--dnsbl", f"zen.test,notxt.test,1,3000,{lists.server}")
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=15) as client:
        client.sendmail("a@example.test", ["b@example.test"], MESSAGE)
        client.sendmail("a@example.test", ["c@example.test"], MESSAGE)
    contents = [p.read_bytes() for p in sorted(relay.spool.glob("*.content"))]
    assert len(contents) == 2
    for content in contents:
        assert content.startswith(b"X-DNSBL: zone=zen.test; ip=127.0.0.1; result=127.0.0.2\r\n"
                                  b"X-DNSBL: zone=notxt.test; ip=127.0.0.1; result=127.0.0.3\r\n"
                                  b"Received: ")
        assert content.endswith(MESSAGE)
    assert "action=tag" in relay.log


def test_tag_mode_headers_are_in_the_file_a_program_filter_reads(inprocess_relay, lists, tmp_path):
    check = tmp_path / "needs-header"
    check.write_text("#!/bin/sh\ngrep -q '^X-DNSBL: zone=zen.test' \"$1\" || { echo '<<no dnsbl header>>'; exit 1; }\n")
    check.chmod(0o755)
    relay = inprocess_relay(enable=["filters", "dnsbl"], config={  # any order
        "dnsbl": {"servers": ["zen.test"], "dns_server": lists.server, "allow": [], "mode": "tag"},
        "filters": {"server": [str(check)]}})
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=15) as client:
        client.sendmail("a@example.test", ["b@example.test"], MESSAGE)
    [message_id] = relay.spool.ids()
    assert relay.spool.read_content(message_id).startswith(b"X-DNSBL: zone=zen.test; ip=127.0.0.1; ")


def test_an_unlisted_client_gets_no_header(dnsbl_relay):
    relay = dnsbl_relay(servers=["clean.test"], mode="tag")
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=15) as client:
        client.sendmail("a@example.test", ["b@example.test"], MESSAGE)
    [message_id] = relay.spool.ids()
    assert relay.spool.read_content(message_id).startswith(b"Received: ")


# ---------------------------------------------------------------- configuration
def test_emailrelay_dnsbl_strings():
    assert parse_spec("zen.test,bl.test") == {"servers": ["zen.test", "bl.test"], "threshold": 1,
                                              "timeout": 5.0, "fail_closed": False, "dns_server": ""}
    assert parse_spec("zen.test,2,500,127.0.0.1:5353") == {
        "servers": ["zen.test"], "threshold": 2, "timeout": 0.5, "fail_closed": False,
        "dns_server": "127.0.0.1:5353"}
    assert parse_spec("zen.test,1,-5s")["fail_closed"] is True
    assert parse_spec("zen.test,1,-5s")["timeout"] == 5.0
    assert parse_spec("zen.test,0,-500")["fail_closed"] is False   # only logging: never refuses
    assert parse_spec("1.1.1.1:53,500,1,zen.test,bl.test") == {   # E-MailRelay's older order
        "servers": ["zen.test", "bl.test"], "threshold": 1, "timeout": 0.5, "fail_closed": False,
        "dns_server": "1.1.1.1:53"}
    for bad in ("zen.test,-1", "zen.test,1,soon", "zen.test,1,500,nameserver", "zen.test,1,500,1.1.1.1,extra",
                "1.1.1.1,500,1", "zen.test,1,0"):
        with pytest.raises(ConfigError, match="--dnsbl"):
            parse_spec(bad)
    with pytest.raises(ConfigError, match=r"\[dnsbl\] allow"):
        DnsblSettings(servers=["zen.test"], allow=["10.0.0.0/33"])
    assert DnsblSettings().servers == []   # the core builds defaults; start-up refuses them


def test_enabling_the_plugin_without_lists_is_an_error(relay_process):
    relay = relay_process("--plugins", "dnsbl", wait=False)
    assert relay.proc.wait(30) == 1
    assert "[dnsbl] servers: no lists given" in relay.log


def test_a_bad_dnsbl_option_stops_the_relay(relay_process):
    relay = relay_process("--dnsbl", "zen.test,-1", wait=False)
    assert relay.proc.wait(30) == 1
    assert "--dnsbl 'zen.test,-1': threshold '-1' is not a whole number" in relay.log


def test_query_names():
    assert query_name(ipaddress.ip_address("192.0.2.99"), "zen.test") == "99.2.0.192.zen.test."
    assert query_name(ipaddress.ip_address("2001:db8::1"), "zen.test") == \
        "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.zen.test."
    assert client_address("::ffff:192.0.2.7") == ipaddress.ip_address("192.0.2.7")
    assert client_address("fe80::1%eth0") == ipaddress.ip_address("fe80::1")
    assert client_address("") is None
