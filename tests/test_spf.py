"""SPF at MAIL FROM (the ``mailauth`` plugin): records served by a real dnsmasq, the client's
address taken from the PROXY header (a relay behind a load balancer judges the real client), the
policy for each result, and DNS trouble that defers or is tagged, never passes silently."""

from __future__ import annotations

import re

import pytest

from conftest import dnsmasq_serving, free_port, submit
from mailauth_peers import send_as, txt_option
from test_proxy_protocol import _wire_from, haproxy  # noqa: F401  (fixture: HAProxy with send-proxy-v2)

CLIENT = "203.0.113.9"
MESSAGE = b"From: <a@pass.test>\r\nTo: <b@relay.test>\r\nSubject: spf\r\n\r\nhello\r\n"


@pytest.fixture(scope="module")
def spf_dns(tmp_path_factory, dns_servfail):
    """SPF records for the tests, and names whose lookups fail (SERVFAIL) or never answer."""
    workdir = tmp_path_factory.mktemp("spf-dns")
    port = free_port()
    records = [
        txt_option("pass.test", f"v=spf1 ip4:{CLIENT} -all"),
        txt_option("fail.test", "v=spf1 ip4:192.0.2.1 -all exp=why.fail.test"),
        txt_option("why.fail.test", "%{i} is not one of %{d}'s designated mail servers"),
        txt_option("soft.test", "v=spf1 ip4:192.0.2.1 ~all"),
        txt_option("loopback.test", "v=spf1 ip4:127.0.0.0/8 -all"),
        txt_option("local5.test", "v=spf1 ip4:127.0.0.5 -all"),
        txt_option("include.test", "v=spf1 include:pass.test -all"),
        txt_option("helo.test", "v=spf1 a -all"), f"--host-record=helo.test,{CLIENT}",
        txt_option("badhelo.test", "v=spf1 -all"),
        txt_option("broken.test", "v=spf1 ip4:300.1.1.1 -all"),
        txt_option("nospf.test", "just some text"),
        "--host-record=probe.test,127.0.0.1",
        f"--server=/servfail.test/{dns_servfail[0]}#{dns_servfail[1]}",
        "--server=/timeout.test/127.0.0.1#9",  # never answered
    ]
    with dnsmasq_serving(workdir, port, records, probe="probe.test", options=["--no-negcache"]):
        yield port


def checking_relay(inprocess_relay, dns_port: int, **sections):
    config = {"server": {"proxy_protocol": True}, "smtp": {"remote_clients": True},
              "relay": {"local_domains": ["relay.test"]},
              "dns": {"nameservers": [f"127.0.0.1:{dns_port}"], "timeout": 1, "attempts": 1}}
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    return inprocess_relay(enable=["mailauth"], config=config)


def results_header(relay, reply: str) -> str:
    """The first header of the message the reply says was queued: ours, unfolded."""
    message_id = reply.split()[-1]
    content = relay.spool.read_content(message_id).decode()
    first = re.match(r"Authentication-Results:((?:.*\r\n)(?:[ \t].*\r\n)*)", content)
    assert first, content[:300]
    return " ".join(first.group(1).split())


def test_a_pass_through_a_proxy_header_is_recorded(inprocess_relay, spf_dns):
    relay = checking_relay(inprocess_relay, spf_dns)
    code, reply = send_as(relay.port, CLIENT, "a@pass.test", ["b@relay.test"], MESSAGE)
    assert code == 250, reply
    assert results_header(relay, reply) == \
        "relay.test; spf=pass smtp.mailfrom=a@pass.test; dkim=none; dmarc=none header.from=pass.test; arc=none"


def test_the_proxied_client_is_judged_not_the_proxy(inprocess_relay, spf_dns):
    """loopback.test lets 127/8 send: the connection comes from 127.0.0.1, but the client is not."""
    relay = checking_relay(inprocess_relay, spf_dns)
    assert send_as(relay.port, CLIENT, "a@loopback.test", ["b@relay.test"], MESSAGE) == \
        (550, f"5.7.23 SPF: loopback.test does not allow {CLIENT} to send its mail")


def test_behind_haproxy_spf_sees_the_real_client(inprocess_relay, spf_dns, haproxy):  # noqa: F811
    # Loopback clients are trusted (relay control's default networks): check them all the same.
    relay = checking_relay(inprocess_relay, spf_dns, mailauth={"exempt_trusted": False})
    front = haproxy(relay.port)
    for source, expected in (("127.0.0.5", 250), ("127.0.0.6", 550)):  # local5.test allows 127.0.0.5 only
        with _wire_from(source, front) as wire:
            assert wire.reply()[0] == 220
            assert wire.cmd("EHLO client.test")[0] == 250
            assert wire.cmd("MAIL FROM:<a@local5.test>")[0] == expected
            wire.cmd("QUIT")


def test_a_fail_is_refused_at_mail_from_with_the_domains_explanation(inprocess_relay, spf_dns):
    relay = checking_relay(inprocess_relay, spf_dns)
    assert send_as(relay.port, CLIENT, "a@fail.test", ["b@relay.test"], MESSAGE) == \
        (550, f"5.7.23 SPF: fail.test does not allow {CLIENT} to send its mail: "
              f"{CLIENT} is not one of fail.test's designated mail servers")
    assert relay.spool.ids() == []


def test_a_fail_is_tagged_when_so_configured(inprocess_relay, spf_dns):
    relay = checking_relay(inprocess_relay, spf_dns, spf={"fail": "tag"})
    code, reply = send_as(relay.port, CLIENT, "a@fail.test", ["b@relay.test"], MESSAGE)
    assert code == 250
    assert "spf=fail smtp.mailfrom=a@fail.test;" in results_header(relay, reply)


@pytest.mark.parametrize("sender, result", [("a@soft.test", "softfail"), ("a@nospf.test", "none"),
                                            ("a@include.test", "pass"), ("a@broken.test", "permerror")])
def test_other_results_are_recorded_and_accepted(inprocess_relay, spf_dns, sender, result):
    relay = checking_relay(inprocess_relay, spf_dns)
    code, reply = send_as(relay.port, CLIENT, sender, ["b@relay.test"], MESSAGE)
    assert code == 250, reply
    assert re.search(rf"spf={result}( \(.*?\))? smtp.mailfrom={sender};", results_header(relay, reply))


def test_a_broken_record_is_refused_when_so_configured(inprocess_relay, spf_dns):
    relay = checking_relay(inprocess_relay, spf_dns, spf={"permerror": "reject"})
    assert send_as(relay.port, CLIENT, "a@broken.test", ["b@relay.test"], MESSAGE) == \
        (550, "5.7.24 SPF: the record of broken.test is broken")


def test_the_null_sender_is_checked_by_its_helo_name(inprocess_relay, spf_dns):
    relay = checking_relay(inprocess_relay, spf_dns)
    code, reply = send_as(relay.port, CLIENT, "", ["b@relay.test"], MESSAGE, helo="helo.test")
    assert code == 250, reply
    assert "spf=pass smtp.helo=helo.test;" in results_header(relay, reply)
    assert send_as(relay.port, CLIENT, "", ["b@relay.test"], MESSAGE, helo="badhelo.test") == \
        (550, f"5.7.23 SPF: badhelo.test does not allow {CLIENT} to send its mail")


@pytest.mark.parametrize("zone", ["servfail.test", "timeout.test"])
def test_dns_trouble_defers_by_default(inprocess_relay, spf_dns, zone):
    relay = checking_relay(inprocess_relay, spf_dns)
    assert send_as(relay.port, CLIENT, f"a@x.{zone}", ["b@relay.test"], MESSAGE) == \
        (451, f"4.7.24 SPF: could not check x.{zone} now (DNS), try again later")


def test_dns_trouble_is_tagged_and_accepted_when_so_configured(inprocess_relay, spf_dns):
    relay = checking_relay(inprocess_relay, spf_dns, mailauth={"temperror": "tag"})
    code, reply = send_as(relay.port, CLIENT, "a@x.servfail.test", ["b@relay.test"], MESSAGE)
    assert code == 250, reply
    assert re.search(r"spf=temperror \(x\.servfail\.test TXT: NoNameservers\) smtp.mailfrom=a@x.servfail.test;",
                     results_header(relay, reply))


def test_trusted_clients_are_not_checked_unless_so_configured(inprocess_relay, spf_dns):
    """Loopback is in relay control's networks: its mail is ours, signed rather than checked."""
    direct = {"proxy_protocol": False}
    relay = checking_relay(inprocess_relay, spf_dns, server=direct)
    assert submit(relay.port, MESSAGE, sender="a@fail.test", recipients=["b@relay.test"]) == (250, "")
    (message_id,) = relay.spool.ids()
    assert b"Authentication-Results" not in relay.spool.read_content(message_id)
    checking = checking_relay(inprocess_relay, spf_dns, server=direct, mailauth={"exempt_trusted": False})
    with pytest.raises(Exception, match="5.7.23 SPF: fail.test does not allow 127.0.0.1"):
        submit(checking.port, MESSAGE, sender="a@fail.test", recipients=["b@relay.test"])
