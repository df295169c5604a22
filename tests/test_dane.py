"""DANE (RFC 7672) in the forwarding client, end to end with a real validating resolver.

A zone ``dane.test`` is signed here with ldns-signzone and served by unbound (an auth-zone used as
upstream data, so unbound's validator checks it against our trust anchor and sets the AD bit);
``plain.test`` is unsigned local data (no AD). The TLSA records are computed with the openssl
command line from the certificates an SMTP sink then presents; every MX host is 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import smtplib
import ssl
import subprocess
import time

import dns.asyncresolver
import dns.resolver
import pytest
import trustme

from conftest import free_port, require
from mailrelay_plugins.forward.dane import lookup_tlsa, validating_resolver
from mailrelay_plugins.forward.mx import resolve_mail_hosts
from sinks import Sink
from test_mta_sts import PolicyServer, deferred, policy

MSG = b"From: a@example.test\r\nTo: u@ee.dane.test\r\nSubject: dane\r\n\r\nbody\r\n"
PAST = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)


def openssl(*args: str, data: bytes) -> bytes:
    return subprocess.run([require("openssl"), *args], input=data, capture_output=True, check=True).stdout


def tlsa(pem: bytes, selector: int, mtype: int) -> str:
    """TLSA association data the way an operator computes it (openssl, not our code)."""
    der = openssl("x509", "-outform", "DER", data=pem) if selector == 0 else openssl(
        "pkey", "-pubin", "-outform", "DER", data=openssl("x509", "-noout", "-pubkey", data=pem))
    if mtype == 0:
        return der.hex()
    return openssl("dgst", "-sha256" if mtype == 1 else "-sha512", "-r", data=der).split()[0].decode()


class Certificates:
    """What the sink may present, made once per module (the zone's TLSA records depend on them)."""

    def __init__(self) -> None:
        # DANE-EE: an untrusted CA, a name that is not the MX host, long expired; only the key counts.
        self.ee = trustme.CA().issue_cert("unrelated.example", not_before=PAST - datetime.timedelta(days=30),
                                          not_after=PAST)
        # DANE-TA: an intermediate CA the server sends in its chain is the trust anchor.
        self.anchor = trustme.CA().create_child_ca()
        self.ta = self.anchor.issue_cert("mx.ta.dane.test")
        self.ta_expired = self.anchor.issue_cert("mx.ta.dane.test", not_before=PAST - datetime.timedelta(days=30),
                                                 not_after=PAST)
        self.ta_alias = self.anchor.issue_cert("mx.aliasta.dane.test")  # the MX host name, not the expanded one
        self.other = trustme.CA().issue_cert("mx.ee.dane.test")


@pytest.fixture(scope="module")
def certs() -> Certificates:
    return Certificates()


def zone(certs: Certificates, port: int) -> str:
    ee_key = tlsa(certs.ee.cert_chain_pems[0].bytes(), 1, 1)
    anchor = tlsa(certs.anchor.cert_pem.bytes(), 0, 1)
    lines = ["$ORIGIN dane.test.", "$TTL 60", "@ SOA ns.dane.test. admin.dane.test. 1 3600 600 86400 60",
             "@ NS ns.dane.test.", "ns A 127.0.0.1"]
    tlsa_records = {
        "ee": [f"3 1 1 {ee_key}", f"3 0 2 {'00' * 64}"],      # the second record matches nothing: ignored
        "ta": [f"2 0 1 {anchor}"],
        "taname": [f"2 0 1 {anchor}"],                          # the sink's certificate has another name
        "mismatch": [f"3 1 1 {'ab' * 32}"],
        "unusable": [f"1 1 1 {ee_key}"],                         # PKIX-EE: unusable in SMTP, TLS still required
        "bogus": [f"3 1 1 {ee_key}"],                            # altered after signing, below
        "both": [f"3 1 1 {ee_key}"],
    }
    for label, records in tlsa_records.items():
        lines += [f"{label} MX 10 mx.{label}", f"mx.{label} A 127.0.0.1"]
        lines += [f"_{port}._tcp.mx.{label} TLSA {record}" for record in records]
    # MX hosts that are CNAME aliases (RFC 7672 section 2.2.2): records at the expanded name, which
    # come first; records at the MX host name only, the fallback; DANE-TA at the expanded name.
    lines += ["alias MX 10 mx.alias", "mx.alias CNAME host.alias", "host.alias A 127.0.0.1",
              f"_{port}._tcp.host.alias TLSA 3 1 1 {ee_key}", f"_{port}._tcp.mx.alias TLSA 3 1 1 {'cd' * 32}",
              "aliasorig MX 10 mx.aliasorig", "mx.aliasorig CNAME host.aliasorig", "host.aliasorig A 127.0.0.1",
              f"_{port}._tcp.mx.aliasorig TLSA 3 1 1 {ee_key}",
              "aliasta MX 10 mx.aliasta", "mx.aliasta CNAME host.aliasta", "host.aliasta A 127.0.0.1",
              f"_{port}._tcp.host.aliasta TLSA 2 0 1 {anchor}"]
    lines += ["nodane MX 10 mx.nodane", "mx.nodane A 127.0.0.1",
              "_mta-sts.both TXT \"v=STSv1; id=1\"", "mta-sts.both A 127.0.0.1"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def resolver_port(tmp_path_factory, certs) -> tuple[int, int]:
    """unbound on a loopback high port validating dane.test; yields (dns port, the MX port)."""
    unbound, keygen, signzone = require("unbound"), require("ldns-keygen"), require("ldns-signzone")
    workdir = tmp_path_factory.mktemp("unbound")
    mx_port, port = free_port(), free_port()
    (workdir / "dane.test.zone").write_text(zone(certs, mx_port))
    key = subprocess.run([keygen, "-a", "ECDSAP256SHA256", "-k", "dane.test"], cwd=workdir, check=True,
                         capture_output=True, text=True).stdout.strip()
    subprocess.run([signzone, "dane.test.zone", key], cwd=workdir, check=True, capture_output=True)
    signed = workdir / "dane.test.zone.signed"
    bogus = f"_{mx_port}._tcp.mx.bogus.dane.test."
    text = signed.read_text()
    assert text.count(bogus) >= 2  # the record and its signature
    signed.write_text("\n".join(line[:-8] + "00000000" if line.startswith(bogus) and "\tTLSA\t" in line else line
                                for line in text.splitlines()) + "\n")
    (workdir / "unbound.conf").write_text(f"""server:
    interface: 127.0.0.1@{port}
    do-daemonize: no
    chroot: ""
    username: ""
    directory: "{workdir}"
    pidfile: ""
    use-syslog: no
    logfile: ""
    verbosity: 1
    module-config: "validator iterator"
    auto-trust-anchor-file: ""
    trust-anchor-file: "{workdir / (key + '.ds')}"
    local-zone: "test." nodefault
    domain-insecure: "plain.test."
    local-zone: "plain.test." static
    local-data: "plain.test. MX 10 mx.plain.test."
    local-data: "mx.plain.test. A 127.0.0.1"
    local-data: "_{mx_port}._tcp.mx.plain.test. TLSA 3 1 1 {'ab' * 32}"
auth-zone:
    name: "dane.test."
    zonefile: "{signed}"
    for-upstream: yes
    for-downstream: no
    fallback-enabled: no
""")
    with open(workdir / "unbound.log", "wb") as log:
        proc = subprocess.Popen([unbound, "-d", "-c", str(workdir / "unbound.conf")], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    probe = dns.resolver.Resolver(configure=False)
    probe.nameservers, probe.port, probe.lifetime = ["127.0.0.1"], port, 0.5
    end = time.monotonic() + 15
    while True:
        if proc.poll() is not None:
            pytest.fail(f"unbound exited: {(workdir / 'unbound.log').read_text()}")
        try:
            probe.resolve("mx.ee.dane.test", "A")
            break
        except Exception:
            if time.monotonic() > end:
                pytest.fail("unbound did not answer within 15 s")
            time.sleep(0.05)
    yield port, mx_port
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def mx(resolver_port):
    """Factory: the MX hosts as an SMTP sink on the port the TLSA records name, with this certificate
    (None: no STARTTLS)."""
    started: list[Sink] = []

    def start(certificate: trustme.LeafCert | None) -> Sink:
        context = None
        if certificate is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            certificate.configure_cert(context)
        sink = Sink(resolver_port[1], tls_context=context).start()
        started.append(sink)
        return sink

    yield start
    for sink in started:
        sink.stop()


def dane_relay(inprocess_relay, resolver_port, *, dane: bool = True, **config):
    dns_port, mx_port = resolver_port
    return inprocess_relay(enable=["forward"], config={
        "forward": {"to": "mx", "mx_port": mx_port}, "queue": {"retry": ["1h"]},
        "dns": {"nameservers": [f"127.0.0.1:{dns_port}"], "timeout": 2, "attempts": 1},
        "dane": {"enabled": dane}, **config})


def send(relay, recipient: str) -> str:
    with smtplib.SMTP("127.0.0.1", relay.port) as client:
        client.ehlo("client.test")
        client.mail("a@example.test")
        client.rcpt(recipient)
        code, reply = client.data(MSG)
    assert code == 250
    return reply.decode().rsplit(" ", 1)[1]


# ------------------------------------------------------------------ the AD bit, from a real validator
def test_the_validating_resolver_marks_signed_answers_and_only_those(resolver_port):
    base = dns.asyncresolver.Resolver(configure=False)
    base.nameservers, base.port, base.lifetime = ["127.0.0.1"], resolver_port[0], 2
    validating = validating_resolver(base)

    async def check():
        signed = await resolve_mail_hosts(validating, "ee.dane.test")
        unsigned = await resolve_mail_hosts(validating, "plain.test")
        not_asked = await resolve_mail_hosts(base, "ee.dane.test")  # no AD asked for: none given
        records = await lookup_tlsa(validating, "mx.ee.dane.test", resolver_port[1])
        insecure = await lookup_tlsa(validating, "mx.plain.test", resolver_port[1])
        bogus = await lookup_tlsa(validating, "mx.bogus.dane.test", resolver_port[1])
        return signed, unsigned, not_asked, records, insecure, bogus

    signed, unsigned, not_asked, records, insecure, bogus = asyncio.run(check())
    assert [h.secure for h in signed] == [True] and [h.secure for h in unsigned] == [False]
    assert [h.secure for h in not_asked] == [False]
    assert sorted((r.usage, r.selector, r.mtype) for r in records.records) == [(3, 0, 2), (3, 1, 1)]
    assert insecure.records == () and not insecure.error
    assert bogus.records == () and "SERVFAIL" in bogus.error


# ------------------------------------------------------------------ delivery
def test_dane_ee_matches_the_key_and_ignores_names_expiry_and_ca(inprocess_relay, resolver_port, mx, certs):
    sink = mx(certs.ee)
    relay = dane_relay(inprocess_relay, resolver_port)
    send(relay, "u@ee.dane.test")
    assert sink.wait_for(1)[0].recipients == ["u@ee.dane.test"]


def test_dane_ta_verifies_the_chain_up_to_the_anchor_and_the_mx_name(inprocess_relay, resolver_port, mx, certs):
    sink = mx(certs.ta)
    relay = dane_relay(inprocess_relay, resolver_port)
    send(relay, "u@ta.dane.test")
    assert sink.wait_for(1)[0].recipients == ["u@ta.dane.test"]


NO_MATCH = "no TLSA record matches the server's certificate"


@pytest.mark.parametrize("domain, certificate, reason, records_of", [
    ("mismatch.dane.test", "ee", NO_MATCH, "mx"),
    ("ee.dane.test", "other", NO_MATCH, "mx"),
    ("taname.dane.test", "ta", "leaf certificate has no matching subjectAltName", "mx"),
    ("ta.dane.test", "ta_expired", "cert is not valid at validation time", "mx"),
    # MX hosts that are aliases: the expanded name's records hold; without any, the alias's own
    ("alias.dane.test", "other", NO_MATCH, "host"),
    ("aliasorig.dane.test", "other", NO_MATCH, "mx"),
])
def test_a_certificate_that_does_not_match_defers(inprocess_relay, resolver_port, mx, certs, domain, certificate,
                                                  reason, records_of):
    sink = mx(getattr(certs, certificate))
    relay = dane_relay(inprocess_relay, resolver_port)
    shown = deferred(relay, send(relay, f"u@{domain}"))
    assert f"451 4.7.5 mx.{domain}[127.0.0.1]:{resolver_port[1]}: certificate rejected by the DANE TLSA records " \
           f"of _{resolver_port[1]}._tcp.{records_of}.{domain}:" in shown and reason in shown
    assert sink.received == []


def test_an_mx_alias_uses_the_tlsa_records_of_the_expanded_name_first(inprocess_relay, resolver_port, mx, certs):
    # The expanded name's records match the key; the alias's own (which match nothing) are not used.
    sink = mx(certs.ee)
    relay = dane_relay(inprocess_relay, resolver_port)
    send(relay, "u@alias.dane.test")
    assert sink.wait_for(1)[0].recipients == ["u@alias.dane.test"]


def test_dane_ta_for_an_mx_alias_accepts_a_certificate_for_the_mx_host_name(inprocess_relay, resolver_port, mx,
                                                                           certs):
    sink = mx(certs.ta_alias)
    relay = dane_relay(inprocess_relay, resolver_port)
    send(relay, "u@aliasta.dane.test")
    assert sink.wait_for(1)[0].recipients == ["u@aliasta.dane.test"]


def test_tls_is_mandatory_with_tlsa_records(inprocess_relay, resolver_port, mx):
    sink = mx(None)
    relay = dane_relay(inprocess_relay, resolver_port)
    shown = deferred(relay, send(relay, "u@ee.dane.test"))
    assert f"does not offer STARTTLS, which the DANE TLSA records of _{resolver_port[1]}._tcp.mx.ee.dane.test " \
           "requires" in shown
    shown = deferred(relay, send(relay, "u@unusable.dane.test"))  # only unusable records: encryption still
    assert "(none usable) requires" in shown
    assert sink.received == []


def test_unusable_records_mean_encryption_without_authentication(inprocess_relay, resolver_port, mx, certs):
    sink = mx(certs.other)
    relay = dane_relay(inprocess_relay, resolver_port)
    send(relay, "u@unusable.dane.test")
    sink.wait_for(1)


def test_a_tlsa_lookup_that_fails_validation_makes_the_host_unusable(inprocess_relay, resolver_port, mx, certs):
    sink = mx(certs.ee)
    relay = dane_relay(inprocess_relay, resolver_port)
    shown = deferred(relay, send(relay, "u@bogus.dane.test"))
    assert f"4.7.5 no MX host of bogus.dane.test may be used: mx.bogus.dane.test: TLSA lookup of " \
           f"_{resolver_port[1]}._tcp.mx.bogus.dane.test failed" in shown
    assert sink.received == []


@pytest.mark.parametrize("domain", ["plain.test", "nodane.dane.test"])
def test_without_secure_tlsa_records_delivery_is_opportunistic(inprocess_relay, resolver_port, mx, domain):
    """plain.test has a TLSA record that matches nothing, but unsigned: it does not count."""
    sink = mx(None)
    relay = dane_relay(inprocess_relay, resolver_port)
    send(relay, f"u@{domain}")
    sink.wait_for(1)


def test_dane_disabled_ignores_tlsa_records(inprocess_relay, resolver_port, mx):
    sink = mx(None)
    relay = dane_relay(inprocess_relay, resolver_port, dane=False)
    send(relay, "u@mismatch.dane.test")
    sink.wait_for(1)


def test_dane_takes_precedence_over_mta_sts(inprocess_relay, resolver_port, mx, certs, tmp_path, caplog):
    """both.dane.test: valid DANE-EE records, and an MTA-STS policy (enforce) that lists another MX."""
    authority = trustme.CA()
    (tmp_path / "ca.pem").write_bytes(authority.cert_pem.bytes())
    server = PolicyServer(authority.issue_cert("mta-sts.both.dane.test")).start()
    server.policies = {"mta-sts.both.dane.test": (200, "text/plain", policy("enforce", "mx.elsewhere.test"))}
    try:
        sink = mx(certs.ee)
        sts = {"enabled": True, "ca_file": str(tmp_path / "ca.pem"), "https_port": server.port}
        relay = dane_relay(inprocess_relay, resolver_port, mta_sts=sts)
        send(relay, "u@both.dane.test")
        sink.wait_for(1)
        assert server.hits == {}  # every MX host has DANE: the policy is not even fetched
        # The same domain without DANE: the MTA-STS policy rules, and the MX is not in it.
        relay = dane_relay(inprocess_relay, resolver_port, dane=False, mta_sts=sts)
        with caplog.at_level(logging.INFO, logger="mailrelay"):
            shown = deferred(relay, send(relay, "v@both.dane.test"))
        assert "not in the MTA-STS policy of both.dane.test (mode enforce, id 1)" in shown
        assert server.hits == {"mta-sts.both.dane.test": 1} and len(sink.received) == 1
    finally:
        server.stop()
