"""MTA-STS (RFC 8461) in the forwarding client, against real peers: policies served over HTTPS by a
local server with a trustme CA (trusted through ``[mta_sts] ca_file``), ``_mta-sts`` TXT, MX and
address records from our own dnsmasq, and MX hosts played by an SMTP sink with or without STARTTLS."""

from __future__ import annotations

import asyncio
import http.server
import json
import logging
import os
import smtplib
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import dns.asyncresolver
import pytest
import trustme
from hypothesis import given
from hypothesis import strategies as st

from conftest import dnsmasq_serving, free_port, wait_until
from mailrelay_plugins.forward.mta_sts import MtaSts, PolicyError, mx_matches, parse_policy, parse_txt
from sinks import Sink

MSG = b"From: a@example.test\r\nTo: u@sts.test\r\nSubject: sts\r\nMessage-ID: <sts@example.test>\r\n\r\nbody\r\n"
DOMAINS = ("sts.test", "wildcard.test", "wrongmx.test", "testing.test", "nopolicy.test", "redirect.test")
MX_NAMES = ("mx.sts.test", "mx1.wildcard.test", "mx.elsewhere.test")


def policy(mode: str, *mx: str, max_age: int = 86400) -> str:
    return "version: STSv1\r\nmode: %s\r\n%smax_age: %d\r\n" % (mode, "".join(f"mx: {m}\r\n" for m in mx), max_age)


DEFAULT_POLICIES = {
    "mta-sts.sts.test": (200, "text/plain", policy("enforce", "mx.sts.test")),
    "mta-sts.wildcard.test": (200, "text/plain; charset=utf-8", policy("enforce", "*.wildcard.test")),
    "mta-sts.wrongmx.test": (200, "text/plain", policy("enforce", "mx.wrongmx.test", "*.other.test")),
    "mta-sts.testing.test": (200, "text/plain", policy("testing", "mx.testing.test")),
    "mta-sts.nopolicy.test": (404, "text/plain", "not here"),
    "mta-sts.redirect.test": (301, "text/plain", ""),
}


class PolicyServer:
    """HTTPS on 127.0.0.1 serving ``/.well-known/mta-sts.txt`` per Host header; counts the fetches."""

    def __init__(self, certificate: trustme.LeafCert):
        self.policies: dict[str, tuple[int, str, str]] = dict(DEFAULT_POLICIES)
        self.hits: dict[str, int] = {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                host = self.headers.get("Host", "").rsplit(":", 1)[0]
                server.hits[host] = server.hits.get(host, 0) + 1
                status, media_type, body = server.policies.get(host, (404, "text/plain", "unknown host"))
                if self.path != "/.well-known/mta-sts.txt":
                    status, body = 404, "wrong path"
                self.send_response(status)
                self.send_header("Content-Type", media_type)
                if status == 301:
                    self.send_header("Location", f"https://mta-sts.sts.test:{server.port}/.well-known/mta-sts.txt")
                self.send_header("Content-Length", str(len(body.encode())))
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *args) -> None:
                pass

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        certificate.configure_cert(context)
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="mta-sts-https", daemon=True)

    def start(self) -> "PolicyServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def dns_records(ids: dict[str, str] | None = None) -> list[str]:
    """MX, address and ``_mta-sts`` TXT records for every test domain, everything on 127.0.0.1."""
    ids = {**{d: "20240101" for d in DOMAINS}, **(ids or {})}
    records = ["--mx-host=sts.test,mx.sts.test,10", "--mx-host=wildcard.test,mx1.wildcard.test,10",
               "--mx-host=wrongmx.test,mx.elsewhere.test,10", "--mx-host=testing.test,mx.elsewhere.test,10",
               "--mx-host=nopolicy.test,mx.elsewhere.test,10", "--mx-host=redirect.test,mx.elsewhere.test,10"]
    records += [f"--host-record={name},127.0.0.1" for name in MX_NAMES]
    records += [f"--host-record=mta-sts.{domain},127.0.0.1" for domain in DOMAINS]
    records += [f"--txt-record=_mta-sts.{domain},v=STSv1; id={ids[domain]}" for domain in DOMAINS]
    return records


@pytest.fixture(scope="module")
def ca(tmp_path_factory) -> tuple[trustme.CA, Path]:
    authority = trustme.CA()
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    authority.cert_pem.write_to_path(str(path))
    return authority, path


@pytest.fixture(scope="module")
def policy_server(ca):
    server = PolicyServer(ca[0].issue_cert(*(f"mta-sts.{d}" for d in DOMAINS))).start()
    yield server
    server.stop()


@pytest.fixture
def policies(policy_server):
    """The policy server with the default policies (a test may change them) and no fetches counted."""
    policy_server.policies = dict(DEFAULT_POLICIES)
    policy_server.hits.clear()
    return policy_server


@pytest.fixture(scope="module")
def dns_port(tmp_path_factory) -> int:
    port = free_port()
    workdir = tmp_path_factory.mktemp("dnsmasq-sts")
    with dnsmasq_serving(workdir, port, dns_records(), probe="mx.sts.test", options=["--no-negcache"]):
        yield port


def tls_sink(certificate: trustme.LeafCert | None) -> Sink:
    context = None
    if certificate is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        certificate.configure_cert(context)
    return Sink(free_port(), tls_context=context).start()


@pytest.fixture
def mx_sink(ca):
    """Factory: the MX hosts as one SMTP sink (STARTTLS with a certificate from our CA by default)."""
    started: list[Sink] = []

    def start(certificate: trustme.LeafCert | None | str = "trusted") -> Sink:
        sink = tls_sink(ca[0].issue_cert(*MX_NAMES) if certificate == "trusted" else certificate)
        started.append(sink)
        return sink

    yield start
    for sink in started:
        sink.stop()


def sts_relay(inprocess_relay, sink: Sink, dns_port: int, policies: PolicyServer, ca_file: Path, **sts):
    return inprocess_relay(enable=["forward"], config={
        "forward": {"to": "mx", "mx_port": sink.port}, "queue": {"retry": ["1h"]},
        "dns": {"nameservers": [f"127.0.0.1:{dns_port}"], "timeout": 2, "attempts": 1},
        "mta_sts": {"enabled": True, "ca_file": str(ca_file), "https_port": policies.port, **sts}})


def send(relay, *recipients: str) -> str:
    with smtplib.SMTP("127.0.0.1", relay.port) as client:
        client.ehlo("client.test")
        client.mail("a@example.test")
        for recipient in recipients:
            client.rcpt(recipient)
        code, reply = client.data(MSG)
    assert code == 250
    return reply.decode().rsplit(" ", 1)[1]


def deferred(relay, message_id: str) -> str:
    """Wait until the message was tried and deferred; what `relay queue show` prints for it."""
    wait_until(lambda: (relay.spool.directory / f"{message_id}.retry").exists(), what="a deferred message")
    env = {k: v for k, v in os.environ.items() if k != "MAILRELAY_CONFIG"}
    shown = subprocess.run([sys.executable, "-m", "mailrelay", "queue", "show", message_id, "--spool-dir",
                            str(relay.spool.directory)], capture_output=True, text=True, timeout=30, env=env)
    assert shown.returncode == 0, shown.stderr
    return " ".join(shown.stdout.split())


# ------------------------------------------------------------------ end to end
def test_enforce_delivers_to_a_policy_mx_over_verified_tls(inprocess_relay, mx_sink, dns_port, policies, ca):
    sink = mx_sink()
    relay = sts_relay(inprocess_relay, sink, dns_port, policies, ca[1])
    send(relay, "u@sts.test", "w@wildcard.test")
    assert sorted(r for got in sink.wait_for(2) for r in got.recipients) == ["u@sts.test", "w@wildcard.test"]
    assert policies.hits == {"mta-sts.sts.test": 1, "mta-sts.wildcard.test": 1}
    cached = [json.loads(p.read_text()) for p in (relay.spool.directory / ".mta-sts").glob("*.json")]
    assert sorted(c["domain"] for c in cached) == ["sts.test", "wildcard.test"]


def test_enforce_defers_when_no_mx_is_in_the_policy(inprocess_relay, mx_sink, dns_port, policies, ca):
    sink = mx_sink()
    relay = sts_relay(inprocess_relay, sink, dns_port, policies, ca[1])
    connections = sink.handler.connections  # aiosmtpd's Controller connects once to see it is up
    shown = deferred(relay, send(relay, "u@wrongmx.test"))
    assert "451 4.7.5 no MX host of wrongmx.test may be used" in shown
    assert "MX host mx.elsewhere.test: not in the MTA-STS policy of wrongmx.test (mode enforce" in shown
    assert "allows only mx mx.wrongmx.test, *.other.test" in shown
    assert sink.handler.connections == connections  # never contacted


def test_enforce_defers_when_the_mx_offers_no_starttls(inprocess_relay, mx_sink, dns_port, policies, ca):
    sink = mx_sink(certificate=None)
    relay = sts_relay(inprocess_relay, sink, dns_port, policies, ca[1])
    shown = deferred(relay, send(relay, "u@sts.test"))
    assert f"4.7.5 mx.sts.test[127.0.0.1]:{sink.port} does not offer STARTTLS, which the MTA-STS policy of " \
           "sts.test (mode enforce, id 20240101) requires" in shown
    assert sink.received == []


@pytest.mark.parametrize("which", ["untrusted CA", "wrong name"])
def test_enforce_defers_when_the_certificate_does_not_verify(inprocess_relay, mx_sink, dns_port, policies, ca,
                                                             which):
    certificate = trustme.CA().issue_cert(*MX_NAMES) if which == "untrusted CA" else ca[0].issue_cert("mx.other.test")
    sink = mx_sink(certificate)
    relay = sts_relay(inprocess_relay, sink, dns_port, policies, ca[1])
    shown = deferred(relay, send(relay, "u@sts.test"))
    assert "4.7.5" in shown and "the certificate does not verify for mx.sts.test as the MTA-STS policy of " \
        "sts.test (mode enforce, id 20240101) requires" in shown
    assert ("unable to get local issuer certificate" if which == "untrusted CA" else "Hostname mismatch") in shown
    assert sink.received == []


def test_testing_mode_logs_and_delivers(inprocess_relay, mx_sink, dns_port, policies, ca, caplog):
    sink = mx_sink(trustme.CA().issue_cert(*MX_NAMES))  # neither listed nor verifiable: both only logged
    policies.policies["mta-sts.testing.test"] = (200, "text/plain", policy("testing", "mx.elsewhere.test"))
    relay = sts_relay(inprocess_relay, sink, dns_port, policies, ca[1])
    with caplog.at_level(logging.INFO, logger="mailrelay"):
        send(relay, "u@testing.test")
        [got] = sink.wait_for(1)
    assert got.recipients == ["u@testing.test"]
    assert "MTA-STS policy of testing.test (mode testing, id 20240101) (testing mode, so delivering without it)" \
        in caplog.text and "certificate does not verify for mx.elsewhere.test" in caplog.text


def test_testing_mode_uses_an_mx_the_policy_does_not_list(inprocess_relay, mx_sink, dns_port, policies, ca, caplog):
    sink = mx_sink()
    relay = sts_relay(inprocess_relay, sink, dns_port, policies, ca[1])
    with caplog.at_level(logging.INFO, logger="mailrelay"):
        send(relay, "u@testing.test")
        sink.wait_for(1)
    assert "does not list MX host mx.elsewhere.test (mx: mx.testing.test); testing mode, so using it anyway" \
        in caplog.text


@pytest.mark.parametrize("domain", ["nopolicy.test", "redirect.test"])
def test_no_policy_when_the_fetch_fails_and_nothing_is_cached(inprocess_relay, mx_sink, dns_port, policies, ca,
                                                              domain):
    """A 404, or a redirect (never followed, RFC 8461 3.3): as if the domain had no policy."""
    sink = mx_sink(certificate=None)  # no TLS at all: fine without a policy
    relay = sts_relay(inprocess_relay, sink, dns_port, policies, ca[1])
    send(relay, f"u@{domain}")
    sink.wait_for(1)
    assert policies.hits == {f"mta-sts.{domain}": 1}


def test_a_new_policy_id_is_fetched_and_an_unchanged_one_is_not(inprocess_relay, mx_sink, policies, ca, tmp_path):
    sink = mx_sink()
    port = free_port()
    with dnsmasq_serving(tmp_path, port, dns_records(), probe="mx.sts.test"):
        relay = sts_relay(inprocess_relay, sink, port, policies, ca[1])
        send(relay, "u@sts.test")
        sink.wait_for(1)
        # The policy changes without a new id: the cached one stays in force, nothing is fetched.
        policies.policies["mta-sts.sts.test"] = (200, "text/plain", policy("enforce", "mx.new.test"))
        send(relay, "v@sts.test")
        sink.wait_for(2)
        assert policies.hits == {"mta-sts.sts.test": 1}
    with dnsmasq_serving(tmp_path, port, dns_records({"sts.test": "20250101"}), probe="mx.sts.test"):
        shown = deferred(relay, send(relay, "w@sts.test"))
    assert policies.hits == {"mta-sts.sts.test": 2}
    assert "not in the MTA-STS policy of sts.test (mode enforce, id 20250101), which allows only mx mx.new.test" \
        in shown
    assert len(sink.received) == 2


# ------------------------------------------------------------------ the cache (RFC 8461 5.1)
def fetch(store: MtaSts, domain: str):
    return asyncio.run(store.policy_for(domain))


def store_for(dns_port: int, cache: Path, policies: PolicyServer, ca_file: Path) -> MtaSts:
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers, resolver.port, resolver.lifetime = ["127.0.0.1"], dns_port, 2
    return MtaSts(resolver, cache, ca_file=str(ca_file), https_port=policies.port, timeout=5)


def test_a_cached_policy_survives_a_restart_and_covers_a_failed_fetch(dns_port, policies, ca, tmp_path, caplog):
    first = fetch(store_for(dns_port, tmp_path, policies, ca[1]), "STS.test.")
    assert (first.mode, first.mx, first.id) == ("enforce", ("mx.sts.test",), "20240101")
    # A restart: the policy comes from disk, no fetch (the TXT id is unchanged).
    policies.policies["mta-sts.sts.test"] = (500, "text/plain", "broken")
    again = fetch(store_for(dns_port, tmp_path, policies, ca[1]), "sts.test")
    assert again == first and policies.hits == {"mta-sts.sts.test": 1}
    # The id moved on but the new policy cannot be fetched: the cached one stays in force.
    [path] = tmp_path.glob("*.json")
    path.write_text(path.read_text().replace('"id": "20240101"', '"id": "19990101"'))
    with caplog.at_level(logging.INFO, logger="mailrelay"):
        kept = fetch(store_for(dns_port, tmp_path, policies, ca[1]), "sts.test")
    assert kept is not None and kept.id == "19990101" and kept.mx == ("mx.sts.test",)
    assert "HTTP 500" in caplog.text and "using the cached policy" in caplog.text
    # Expired (max_age passed): not used any more; with the fetch failing there is no policy.
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "fetched": data["fetched"] - 86401}))
    assert fetch(store_for(dns_port, tmp_path, policies, ca[1]), "sts.test") is None


def test_the_policy_host_certificate_must_verify(dns_port, policies, tmp_path):
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    assert fetch(store_for(dns_port, tmp_path, policies, other_ca), "sts.test") is None
    assert list(tmp_path.glob("*.json")) == []


def test_a_wrong_media_type_is_not_a_policy(dns_port, policies, ca, tmp_path):
    policies.policies["mta-sts.sts.test"] = (200, "text/html", policy("enforce", "mx.sts.test"))
    assert fetch(store_for(dns_port, tmp_path, policies, ca[1]), "sts.test") is None


# ------------------------------------------------------------------ parsing and matching
@pytest.mark.parametrize("pattern, host, matches", [
    ("mx.example.com", "MX.Example.COM.", True),
    ("*.example.com", "mx1.example.com", True),
    ("*.example.com", "example.com", False),
    ("*.example.com", "a.b.example.com", False),
    ("*.example.com", "mx1.example.org", False),
    ("*.example.com", ".example.com", False),
    ("mx.example.com", "mx.example.com.evil.test", False),
])
def test_mx_patterns_follow_rfc_8461_section_4_1(pattern, host, matches):
    assert mx_matches(pattern, host) is matches


def test_policy_files_are_parsed_strictly():
    parsed = parse_policy("example.com", "version: STSv1\nmode: enforce\nmx: a.example.com\nmx: *.b.example.com\n"
                          "max_age: 604800\nextension: ignored\n", "abc", 0)
    assert (parsed.mode, parsed.mx, parsed.max_age, parsed.expires) == (
        "enforce", ("a.example.com", "*.b.example.com"), 604800, 604800)
    assert parse_policy("example.com", "version: STSv1\nmode: none\nmax_age: 0\n", "x", 0).mx == ()
    for bad in ("mode: enforce\nmx: a\nmax_age: 1\n", "version: STSv1\nmode: strict\nmx: a\nmax_age: 1\n",
                "version: STSv1\nmode: enforce\nmax_age: 1\n", "version: STSv1\nmode: enforce\nmx: a\nmax_age: -1\n",
                "version: STSv1\nmode: enforce\nmx: a\nmax_age: 31557601\n", "version STSv1\n"):
        with pytest.raises(PolicyError):
            parse_policy("example.com", bad, "x", 0)


def test_txt_records():
    assert parse_txt([b"v=STSv1; id=20160831085700Z;"]) == "20160831085700Z"
    assert parse_txt([b"v=STSv1;", b" id=abc ; ext=1"]) == "abc"
    for bad in ([b"v=STSv2; id=1"], [b"id=1; v=STSv1"], [b"v=STSv1; id="], [b"v=STSv1; id=a-b"],
                [b"v=STSv1; id=" + b"1" * 33], [b"v=STSv1; id=\xff"]):
        with pytest.raises(PolicyError):
            parse_txt(bad)


@given(st.text(max_size=300))
def test_the_policy_parser_never_fails_any_other_way(text):
    try:
        parsed = parse_policy("example.com", text, "x", 0)
    except PolicyError:
        return
    assert parsed.mode in ("enforce", "testing", "none")


def test_an_unreadable_ca_file_stops_the_relay(relay_process, tmp_path):
    config = tmp_path / "relay.conf"
    config.write_text('[plugins]\nenable = ["forward"]\n[forward]\nto = "mx"\n'
                      f'[mta_sts]\nenabled = true\nca_file = "{tmp_path / "missing.pem"}"\n')
    relay = relay_process("--config", str(config), wait=False)
    assert relay.proc.wait(30) == 1
    assert f"[mta_sts] ca_file {tmp_path / 'missing.pem'}: cannot load CA certificates" in relay.log
