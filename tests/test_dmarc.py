"""DKIM verification and DMARC after DATA (the ``mailauth`` plugin), with one Authentication-Results
header: messages signed by Perl's Mail::DKIM, policies served by a real dnsmasq, spoofed From:
addresses refused under p=reject, DNS trouble deferred or tagged, forged results removed."""

from __future__ import annotations

import re

import authres
import pytest

from conftest import dnsmasq_serving, free_port
from mailauth_peers import mail_dkim_sign, new_key, send_as, txt_option

OUTSIDER = "203.0.113.9"       # not in bank.test's SPF record: a forwarder, or a spoofer
BANK_SERVER = "198.51.100.7"   # in bank.test's SPF record


def message(sender: str = "ceo@bank.test", subject: str = "wire transfer", extra: str = "") -> bytes:
    return (f"From: The CEO <{sender}>\r\nTo: <clerk@relay.test>\r\nSubject: {subject}\r\n"
            f"Date: Thu, 01 Jan 2026 00:00:00 +0000\r\nMessage-ID: <m1@bank.test>\r\n{extra}\r\n"
            "Please pay the invoice today.\r\n").encode()


@pytest.fixture(scope="module")
def dmarc_dns(tmp_path_factory, dns_servfail):
    workdir = tmp_path_factory.mktemp("dmarc-dns")
    key, record = new_key(workdir / "keys", "bank.test", "s1")
    servfail = f"{dns_servfail[0]}#{dns_servfail[1]}"
    port = free_port()
    records = [
        txt_option("bank.test", "v=spf1 ip4:198.51.100.0/24 -all"),
        txt_option("_dmarc.bank.test", "v=DMARC1; p=reject; sp=reject; adkim=r; aspf=r"),
        txt_option("s1._domainkey.bank.test", record),
        txt_option("attacker.test", f"v=spf1 ip4:{OUTSIDER} -all"),
        txt_option("quarantine.test", "v=spf1 -all"),
        txt_option("_dmarc.quarantine.test", "v=DMARC1; p=quarantine"),
        txt_option("relaxed.test", "v=spf1 -all"),
        txt_option("_dmarc.relaxed.test", "v=DMARC1; p=none"),
        "--host-record=probe.test,127.0.0.1",
        f"--server=/servfail.test/{servfail}",
        f"--server=/lost._domainkey.bank.test/{servfail}",  # a key whose lookup fails
    ]
    with dnsmasq_serving(workdir, port, records, probe="probe.test", options=["--no-negcache"]):
        yield {"port": port, "key": key}


def checking_relay(inprocess_relay, dns_port: int, **sections):
    config = {"server": {"proxy_protocol": True}, "smtp": {"remote_clients": True},
              "relay": {"local_domains": ["relay.test"]},
              "spf": {"fail": "tag"},  # let DMARC decide
              "dns": {"nameservers": [f"127.0.0.1:{dns_port}"], "timeout": 1, "attempts": 1}}
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    return inprocess_relay(enable=["mailauth"], config=config)


def stored(relay, reply: str) -> bytes:
    return relay.spool.read_content(reply.split()[-1])


def our_results(content: bytes) -> authres.AuthenticationResultsHeader:
    """Our Authentication-Results field, parsed by the authres package (RFC 8601)."""
    head = content.split(b"\r\n\r\n", 1)[0].decode()
    fields = re.findall(r"^Authentication-Results:([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", head, re.M)
    ours = [authres.AuthenticationResultsHeader.parse("Authentication-Results: " + " ".join(f.split()))
            for f in fields]
    mine = [h for h in ours if h.authserv_id == "relay.test"]
    assert len(mine) == 1, fields
    assert head.startswith("Authentication-Results: relay.test;")  # ours is on top
    return mine[0]


def results(header: authres.AuthenticationResultsHeader) -> dict[str, str]:
    return {r.method: r.result for r in header.results}


def test_a_spoofed_from_under_p_reject_is_refused(inprocess_relay, dmarc_dns):
    relay = checking_relay(inprocess_relay, dmarc_dns["port"])
    assert send_as(relay.port, OUTSIDER, "bounce@attacker.test", ["clerk@relay.test"], message()) == \
        (550, "5.7.1 DMARC: From: bank.test is not authenticated (SPF and DKIM fail to align) and its policy "
              "is reject")
    assert relay.spool.ids() == []


def test_a_second_from_address_does_not_dodge_the_policy(inprocess_relay, dmarc_dns):
    relay = checking_relay(inprocess_relay, dmarc_dns["port"])
    content = message().replace(b"From: The CEO <ceo@bank.test>", b"From: ceo@bank.test, me@attacker.test")
    assert send_as(relay.port, OUTSIDER, "me@attacker.test", ["clerk@relay.test"], content)[0] == 550


def test_aligned_dkim_passes_dmarc_for_mail_from_elsewhere(inprocess_relay, dmarc_dns):
    """Mail signed by bank.test (Mail::DKIM), arriving through a forwarder whose SPF is its own."""
    relay = checking_relay(inprocess_relay, dmarc_dns["port"])
    signed = mail_dkim_sign(message(), "bank.test", "s1", dmarc_dns["key"])
    code, reply = send_as(relay.port, OUTSIDER, "fwd@attacker.test", ["clerk@relay.test"], signed)
    assert code == 250, reply
    header = our_results(stored(relay, reply))
    assert results(header) == {"spf": "pass", "dkim": "pass", "dmarc": "pass", "arc": "none"}
    dkim = next(r for r in header.results if r.method == "dkim")
    assert {p.type + "." + p.name: p.value for p in dkim.properties}.items() >= {
        "header.d": "bank.test", "header.s": "s1", "header.a": "rsa-sha256"}.items()


def test_aligned_spf_passes_dmarc(inprocess_relay, dmarc_dns):
    relay = checking_relay(inprocess_relay, dmarc_dns["port"])
    code, reply = send_as(relay.port, BANK_SERVER, "ceo@bank.test", ["clerk@relay.test"], message())
    assert code == 250, reply
    assert results(our_results(stored(relay, reply))) == {"spf": "pass", "dkim": "none", "dmarc": "pass",
                                                          "arc": "none"}


def test_a_changed_signed_message_fails_dkim_and_dmarc(inprocess_relay, dmarc_dns):
    signed = mail_dkim_sign(message(), "bank.test", "s1", dmarc_dns["key"])
    tampered = signed.replace(b"Please pay the invoice today.", b"Please pay MY invoice today.")
    relay = checking_relay(inprocess_relay, dmarc_dns["port"])
    assert send_as(relay.port, OUTSIDER, "fwd@attacker.test", ["clerk@relay.test"], tampered)[0] == 550
    tagging = checking_relay(inprocess_relay, dmarc_dns["port"], dmarc={"reject": "tag"})
    code, reply = send_as(tagging.port, OUTSIDER, "fwd@attacker.test", ["clerk@relay.test"], tampered)
    assert code == 250, reply
    content = stored(tagging, reply)
    assert results(our_results(content)) == {"spf": "pass", "dkim": "fail", "dmarc": "fail", "arc": "none"}
    assert b"dmarc=fail (p=reject dis=reject) header.from=bank.test" in content


def test_a_subdomain_gets_the_organizational_domains_policy(inprocess_relay, dmarc_dns):
    relay = checking_relay(inprocess_relay, dmarc_dns["port"])
    assert send_as(relay.port, OUTSIDER, "x@attacker.test", ["clerk@relay.test"],
                   message(sender="news@mail.bank.test"))[0] == 550


@pytest.mark.parametrize("setting, outcome", [("tag", "accepted"), ("quarantine", "held")])
def test_p_quarantine_is_tagged_or_held(inprocess_relay, dmarc_dns, setting, outcome):
    relay = checking_relay(inprocess_relay, dmarc_dns["port"], dmarc={"quarantine": setting})
    code, reply = send_as(relay.port, OUTSIDER, "x@attacker.test", ["clerk@relay.test"],
                          message(sender="boss@quarantine.test"))
    assert code == 250, reply
    (message_id,) = relay.spool.ids("bad" if outcome == "held" else "ready")
    if outcome == "held":
        assert relay.spool.read_envelope(message_id, "bad").reason == \
            "quarantined: dmarc fail p=quarantine from=quarantine.test"
    assert results(our_results(relay.spool.read_content(message_id)))["dmarc"] == "fail"


def test_p_none_is_only_recorded(inprocess_relay, dmarc_dns):
    relay = checking_relay(inprocess_relay, dmarc_dns["port"])
    code, reply = send_as(relay.port, OUTSIDER, "x@attacker.test", ["clerk@relay.test"],
                          message(sender="info@relaxed.test"))
    assert code == 250
    assert b"dmarc=fail (p=none dis=none) header.from=relaxed.test" in stored(relay, reply)


def test_a_policy_that_cannot_be_looked_up_defers_or_is_tagged(inprocess_relay, dmarc_dns):
    relay = checking_relay(inprocess_relay, dmarc_dns["port"])
    assert send_as(relay.port, OUTSIDER, "x@attacker.test", ["clerk@relay.test"],
                   message(sender="ceo@corp.servfail.test")) == \
        (451, "4.7.0 DMARC: could not check From: corp.servfail.test now (DNS), try again later")
    tagging = checking_relay(inprocess_relay, dmarc_dns["port"], mailauth={"temperror": "tag"})
    code, reply = send_as(tagging.port, OUTSIDER, "x@attacker.test", ["clerk@relay.test"],
                          message(sender="ceo@corp.servfail.test"))
    assert code == 250, reply
    assert results(our_results(stored(tagging, reply)))["dmarc"] == "temperror"


def test_a_key_that_cannot_be_looked_up_does_not_decide_dmarc(inprocess_relay, dmarc_dns):
    """The signature might have passed: under p=reject that is a temporary failure, not a refusal."""
    signed = mail_dkim_sign(message(), "bank.test", "lost", dmarc_dns["key"])
    relay = checking_relay(inprocess_relay, dmarc_dns["port"])
    assert send_as(relay.port, OUTSIDER, "x@attacker.test", ["clerk@relay.test"], signed)[0] == 451
    tagging = checking_relay(inprocess_relay, dmarc_dns["port"], mailauth={"temperror": "tag"})
    code, reply = send_as(tagging.port, OUTSIDER, "x@attacker.test", ["clerk@relay.test"], signed)
    assert code == 250
    assert results(our_results(stored(tagging, reply))) == {"spf": "pass", "dkim": "temperror",
                                                            "dmarc": "temperror", "arc": "none"}


def test_results_claiming_our_name_are_removed_others_kept(inprocess_relay, dmarc_dns):
    forged = ("Authentication-Results: relay.test; dkim=pass header.d=bank.test; dmarc=pass\r\n"
              "Authentication-Results: (sneaky) RELAY.TEST 1; spf=pass\r\n"
              "Authentication-Results: mx.elsewhere.test; spf=fail smtp.mailfrom=attacker.test\r\n")
    relay = checking_relay(inprocess_relay, dmarc_dns["port"])
    content = forged.encode() + message(sender="x@attacker.test")
    code, reply = send_as(relay.port, OUTSIDER, "x@attacker.test", ["clerk@relay.test"], content)
    assert code == 250, reply
    stored_content = stored(relay, reply)
    assert results(our_results(stored_content))["dkim"] == "none"  # exactly one of ours: the real one
    assert b"Authentication-Results: mx.elsewhere.test; spf=fail" in stored_content
    assert b"sneaky" not in stored_content


def test_a_message_without_from_is_recorded_as_permerror(inprocess_relay, dmarc_dns):
    relay = checking_relay(inprocess_relay, dmarc_dns["port"])
    content = b"To: <clerk@relay.test>\r\nSubject: who am I\r\n\r\nhi\r\n"
    code, reply = send_as(relay.port, OUTSIDER, "x@attacker.test", ["clerk@relay.test"], content)
    assert code == 250
    assert b"dmarc=permerror (no From: address)" in stored(relay, reply)


@pytest.mark.parametrize("garbage, method, result", [
    ("DKIM-Signature: v=1; a=rsa-sha256; d=relaxed.test; s=s1; b=@@@; bh=; h=from", "dkim", "permerror"),
    ("DKIM-Signature: this is not a tag list", "dkim", "permerror"),
    ("ARC-Seal: i=1; a=rsa-sha256; cv=none; d=relaxed.test; s=s1; b=AAAA", "arc", "fail"),
])
def test_broken_signatures_are_results_never_crashes(inprocess_relay, dmarc_dns, garbage, method, result):
    relay = checking_relay(inprocess_relay, dmarc_dns["port"])
    content = garbage.encode() + b"\r\n" + message(sender="info@relaxed.test")
    code, reply = send_as(relay.port, OUTSIDER, "x@attacker.test", ["clerk@relay.test"], content)
    assert code == 250, reply
    assert results(our_results(stored(relay, reply)))[method] == result
