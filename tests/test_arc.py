"""ARC (RFC 8617): a relay that checks mail on the way in and forwards it seals it, so that the next
receiver can trust what we saw. Chains are verified with dkimpy and with Perl's
Mail::DKIM::ARC::Verifier, over keys a real dnsmasq publishes."""

from __future__ import annotations

import re

import dkim
import dns.resolver
import pytest

from conftest import dnsmasq_serving, free_port, submit
from mailauth_peers import mail_dkim_arc_verify, mail_dkim_sign, new_key, send_as, txt_option

ORIGINAL = (b"From: The CEO <ceo@bank.test>\r\nTo: <clerk@relay.test>\r\nSubject: minutes\r\n"
            b"Date: Thu, 01 Jan 2026 00:00:00 +0000\r\nMessage-ID: <arc.1@bank.test>\r\n\r\n"
            b"The board met today.\r\n")


@pytest.fixture(scope="module")
def arc_dns(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("arc-dns")
    bank_key, bank_record = new_key(workdir / "keys", "bank.test", "s1")
    hop1_key, hop1_record = new_key(workdir / "keys", "relay.test", "arc1")
    hop2_key, hop2_record = new_key(workdir / "keys", "hop2.test", "arc2")
    port = free_port()
    records = [txt_option("bank.test", "v=spf1 ip4:198.51.100.0/24 -all"),
               txt_option("_dmarc.bank.test", "v=DMARC1; p=reject"),
               txt_option("s1._domainkey.bank.test", bank_record),
               txt_option("arc1._domainkey.relay.test", hop1_record),
               txt_option("arc2._domainkey.hop2.test", hop2_record),
               "--host-record=probe.test,127.0.0.1"]
    with dnsmasq_serving(workdir, port, records, probe="probe.test", options=["--no-negcache"]):
        yield {"port": port, "bank": bank_key, "hop1": hop1_key, "hop2": hop2_key}


def forwarding_relay(inprocess_relay, arc_dns, sink_port: int, domain: str, selector: str, key, **extra):
    config = {"server": {"proxy_protocol": True, "domain": domain}, "smtp": {"remote_clients": True},
              "relay": {"local_domains": ["relay.test"]}, "spf": {"fail": "tag"},
              "dns": {"nameservers": [f"127.0.0.1:{arc_dns['port']}"], "timeout": 1, "attempts": 1},
              "dkim": {"domain": domain, "selector": selector, "key": str(key)},
              "forward": {"to": f"127.0.0.1:{sink_port}"}, **extra}
    return inprocess_relay(enable=["mailauth", "dkim-sign", "forward"], config=config)


def dkimpy_arc(content: bytes, port: int) -> tuple[bytes, str]:
    """dkimpy's verdict on the chain, its keys fetched from our dnsmasq."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers, resolver.port, resolver.lifetime = ["127.0.0.1"], port, 5

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        try:
            answer = resolver.resolve(name.decode().rstrip("."), "TXT")
        except dns.exception.DNSException:
            return None
        return b"".join(answer[0].strings)

    cv, _, reason = dkim.arc_verify(content, dnsfunc=dnsfunc)
    return cv, reason


def test_forwarded_mail_keeps_a_valid_arc_chain_over_two_hops(inprocess_relay, sink, arc_dns):
    port = arc_dns["port"]
    signed = mail_dkim_sign(ORIGINAL, "bank.test", "s1", arc_dns["bank"])
    # Hop 1 (relay.test) checks mail from outside and seals it on the way out.
    first_sink = sink()
    hop1 = forwarding_relay(inprocess_relay, arc_dns, first_sink.port, "relay.test", "arc1", arc_dns["hop1"])
    assert send_as(hop1.port, "203.0.113.9", "list@lists.test", ["clerk@relay.test"], signed)[0] == 250
    after_one = first_sink.wait_for(1)[0].content
    head = after_one.split(b"\r\n\r\n", 1)[0]
    assert re.search(rb"^ARC-Seal: i=1; cv=none; a=rsa-sha256; d=relay\.test; s=arc1;", head, re.M)
    assert re.search(rb"^ARC-Authentication-Results: i=1; relay\.test;", head, re.M)
    assert b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=relay.test" not in head  # not our mail
    assert dkimpy_arc(after_one, port)[0] == b"pass"
    assert mail_dkim_arc_verify(after_one, port)[0] == "pass"

    # Hop 2 (hop2.test) receives it from hop 1's address: SPF fails there, DKIM and ARC hold.
    second_sink = sink()
    hop2 = forwarding_relay(inprocess_relay, arc_dns, second_sink.port, "hop2.test", "arc2", arc_dns["hop2"])
    code, reply = send_as(hop2.port, "192.0.2.25", "ceo@bank.test", ["clerk@relay.test"], after_one)
    assert code == 250, reply
    after_two = second_sink.wait_for(1)[0].content
    results = re.search(rb"^Authentication-Results: hop2\.test;(.*?)\r\n(?! )(?!\t)", after_two, re.M | re.S)
    assert results and b"arc=pass (i=1)" in results.group(1) and b"dmarc=pass" in results.group(1)
    assert re.search(rb"^ARC-Seal: i=2; cv=pass; a=rsa-sha256; d=hop2\.test; s=arc2;", after_two, re.M)
    assert dkimpy_arc(after_two, port)[0] == b"pass"
    assert mail_dkim_arc_verify(after_two, port)[0] == "pass"


def test_a_message_changed_after_sealing_breaks_the_chain(inprocess_relay, sink, arc_dns):
    port = arc_dns["port"]
    first_sink = sink()
    hop1 = forwarding_relay(inprocess_relay, arc_dns, first_sink.port, "relay.test", "arc1", arc_dns["hop1"])
    signed = mail_dkim_sign(ORIGINAL, "bank.test", "s1", arc_dns["bank"])
    assert send_as(hop1.port, "203.0.113.9", "list@lists.test", ["clerk@relay.test"], signed)[0] == 250
    changed = first_sink.wait_for(1)[0].content.replace(b"The board met today.", b"The board met never.")
    assert dkimpy_arc(changed, port)[0] == b"fail"
    assert mail_dkim_arc_verify(changed, port)[0] == "fail"
    second_sink = sink()
    hop2 = forwarding_relay(inprocess_relay, arc_dns, second_sink.port, "hop2.test", "arc2", arc_dns["hop2"],
                            dmarc={"reject": "tag"})
    assert send_as(hop2.port, "192.0.2.25", "ceo@bank.test", ["clerk@relay.test"], changed)[0] == 250
    after_two = second_sink.wait_for(1)[0].content
    results = re.search(rb"^Authentication-Results: hop2\.test;(.*?)\r\n(?! )(?!\t)", after_two, re.M | re.S)
    assert results and re.search(rb"\barc=fail\b", results.group(1)) and b"dkim=fail" in results.group(1)
    assert re.search(rb"^ARC-Seal: i=2; cv=fail;", after_two, re.M)  # the next hop learns it broke


def test_mail_we_did_not_check_is_not_sealed(inprocess_relay, sink, arc_dns):
    """Loopback is trusted, so not checked: there are no results of ours to vouch for."""
    target = sink()
    relay = forwarding_relay(inprocess_relay, arc_dns, target.port, "relay.test", "arc1", arc_dns["hop1"],
                             server={"domain": "relay.test"})  # no PROXY header: a local client
    assert submit(relay.port, ORIGINAL, sender="ceo@bank.test", recipients=["clerk@relay.test"]) == (250, "")
    assert b"ARC-Seal" not in target.wait_for(1)[0].content
