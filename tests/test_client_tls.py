"""TLS and AUTH towards the next hop, as E-MailRelay's client options configure them: STARTTLS
(-j), implicit TLS (-b), a client certificate, certificate verification and the name in it, SNI,
--tls-config versions, and --client-auth-config mechanism preferences.

The next hop is the aiosmtpd sink of tests/sinks.py with a real TLS context (trustme
certificates); it records each delivery's TLS version, the client certificate it saw and the
server name the client sent.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme

from conftest import free_port, submit, wait_until
from mailrelay.cli import cli, expand_options_file, load
from mailrelay.config.loader import ConfigError
from mailrelay_plugins.forward.client_auth import MechanismPreference, parse_client_auth_config
from mailrelay_plugins.forward.client_tls import name_problem
from sinks import Behaviour, Sink, _Controller

MSG = b"From: a@example.test\r\nTo: x@far.test\r\nSubject: tls out\r\n\r\nhello\r\n"


# ---------------------------------------------------------------- certificates and sinks
@dataclass
class Pki:
    ca: trustme.CA
    other_ca: trustme.CA
    dir: Path

    @property
    def ca_file(self) -> str:
        return str(self.dir / "ca.pem")

    @property
    def other_ca_file(self) -> str:
        return str(self.dir / "other-ca.pem")

    @property
    def client_pem(self) -> str:
        return str(self.dir / "client.pem")


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    found = Pki(trustme.CA(), trustme.CA(), directory)
    found.ca.cert_pem.write_to_path(found.ca_file)
    found.other_ca.cert_pem.write_to_path(found.other_ca_file)
    client = found.ca.issue_cert("relay.test", common_name="relay.test")
    client.private_key_and_cert_chain_pem.write_to_path(found.client_pem)
    client.private_key_pem.write_to_path(str(directory / "client.key"))
    (directory / "client.crt").write_bytes(b"".join(blob.bytes() for blob in client.cert_chain_pems))
    return found


@dataclass
class TlsSink:
    """A sink and what it saw: per delivery the TLS version and client certificate; per
    handshake the server name the client sent (None: no SNI)."""

    sink: Sink
    deliveries: list[dict[str, Any]] = field(default_factory=list)
    server_names: list[str | None] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.sink.port


@pytest.fixture
def tls_sink(pki):
    started: list[Sink] = []

    def start(*, implicit: bool = False, ask_for_certificate: bool = False, account: tuple[str, str] | None = None,
              max_version: ssl.TLSVersion | None = None) -> TlsSink:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        pki.ca.issue_cert("mx.example.test", "127.0.0.1", common_name="mx.example.test").configure_cert(context)
        if ask_for_certificate:  # asked for, checked against our CA, not required
            context.verify_mode = ssl.CERT_OPTIONAL
            pki.ca.configure_trust(context)
        if max_version is not None:
            context.maximum_version = max_version
        port = free_port()
        sink = Sink(port, Behaviour(), tls_context=None if implicit else context, account=account)
        if implicit:  # SMTPS: the sink's listener does the handshake
            sink.controller = _Controller(sink.handler, hostname="127.0.0.1", port=port, ssl_context=context,
                                          ready_timeout=10)
        seen = TlsSink(sink)
        context.sni_callback = lambda ssl_object, name, ctx: seen.server_names.append(name)  # type: ignore
        plain = sink.handler.handle_DATA

        async def handle_data(server, session, envelope):
            ssl_object = server.transport.get_extra_info("ssl_object")
            seen.deliveries.append({"tls": ssl_object.version() if ssl_object else None,
                                    "peercert": server.transport.get_extra_info("peercert")})
            return await plain(server, session, envelope)

        sink.handler.handle_DATA = handle_data
        sink.start()
        started.append(sink)
        seen.server_names.clear()  # the controller's own readiness probe
        return seen

    yield start
    for sink in started:
        sink.stop()


def queue_show(spool: Path) -> str:
    """Wait until the one message was tried and deferred; what `relay queue show` prints for it."""
    [retry] = wait_until(lambda: list(spool.glob("*.retry")), what="a deferred message")
    message_id = retry.name.removesuffix(".retry")
    env = {k: v for k, v in os.environ.items() if k != "MAILRELAY_CONFIG"}
    shown = subprocess.run([sys.executable, "-m", "mailrelay", "queue", "show", message_id, "--spool-dir",
                            str(spool)], capture_output=True, text=True, timeout=30, env=env)
    assert shown.returncode == 0, shown.stderr
    return " ".join(shown.stdout.split())


def forward(relay_process, target: TlsSink, *options: str):
    """A relay process forwarding to ``target`` with these command-line options; one message sent."""
    running = relay_process("--forward-to", f"127.0.0.1:{target.port}", *options)
    assert submit(running.port, MSG) == (250, "")
    return running


# ---------------------------------------------------------------- STARTTLS and implicit TLS
def test_client_tls_uses_starttls_when_the_next_hop_offers_it(relay_process, tls_sink):
    target = tls_sink()
    forward(relay_process, target, "--client-tls")
    [got] = target.sink.wait_for(1)
    assert got.recipients == ["x@far.test"]
    assert target.deliveries[0]["tls"] in ("TLSv1.2", "TLSv1.3")  # the sink only takes mail after STARTTLS


def test_client_tls_connection_talks_tls_from_the_first_byte(relay_process, tls_sink):
    target = tls_sink(implicit=True)
    forward(relay_process, target, "-b")
    target.sink.wait_for(1)
    assert target.deliveries[0]["tls"] in ("TLSv1.2", "TLSv1.3")


def test_without_client_tls_connection_an_smtps_port_is_not_understood(relay_process, tls_sink):
    target = tls_sink(implicit=True)
    running = forward(relay_process, target, "--client-tls", "--connection-timeout", "2")
    assert "451 4.4.1" in queue_show(running.spool)  # no greeting: the sink waits for a TLS handshake
    assert target.sink.received == []


def test_client_tls_and_client_tls_connection_cannot_be_combined(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mailrelay", "--no-daemon", "-j", "-b", "--spool-dir",
                             str(tmp_path / "s")], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "the --client-tls and --client-tls-connection options cannot be used together" in result.stderr


# ---------------------------------------------------------------- client certificate
@pytest.mark.parametrize("form", ["one file", "key then certificate"])
def test_the_next_hop_sees_the_client_certificate(relay_process, tls_sink, pki, form):
    target = tls_sink(ask_for_certificate=True)
    files = [pki.client_pem] if form == "one file" else [str(pki.dir / "client.key"), str(pki.dir / "client.crt")]
    forward(relay_process, target, *(arg for f in files for arg in ("--client-tls-certificate", f)))
    target.sink.wait_for(1)
    subject = dict(rdn[0] for rdn in target.deliveries[0]["peercert"]["subject"])
    assert subject["commonName"] == "relay.test"


def test_without_a_client_certificate_none_is_presented(relay_process, tls_sink):
    target = tls_sink(ask_for_certificate=True)
    forward(relay_process, target)
    target.sink.wait_for(1)
    assert target.deliveries[0]["peercert"] is None


def test_an_unusable_client_certificate_stops_the_start_naming_the_file(tmp_path, pki):
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    result = subprocess.run([sys.executable, "-m", "mailrelay", "--no-daemon", "--port", str(free_port()),
                             "--spool-dir", str(tmp_path / "s"), "--forward-to", "127.0.0.1:25",
                             "--client-tls-certificate", str(bad)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert f"--client-tls-certificate {bad}: not a readable PEM private key" in result.stderr


# ---------------------------------------------------------------- verification
def test_a_certificate_from_the_trusted_ca_verifies(relay_process, tls_sink, pki):
    target = tls_sink()
    forward(relay_process, target, "-j", "--client-tls-verify", pki.ca_file)
    assert target.sink.wait_for(1)[0].recipients == ["x@far.test"]


def test_a_certificate_that_does_not_verify_defers_with_the_reason(relay_process, tls_sink, pki):
    target = tls_sink()
    running = forward(relay_process, target, "-j", "--client-tls-verify", pki.other_ca_file)
    shown = queue_show(running.spool)
    assert (f"451 4.7.5 127.0.0.1:{target.port}: the server certificate does not verify against the CAs of "
            f"--client-tls-verify {pki.other_ca_file}: unable to get local issuer certificate") in shown
    assert target.sink.received == []


def test_verify_over_implicit_tls_defers_too(relay_process, tls_sink, pki):
    target = tls_sink(implicit=True)
    running = forward(relay_process, target, "-b", "--client-tls-verify", "<default>")
    assert "4.7.5 127.0.0.1:%d: the server certificate does not verify against the CAs of --client-tls-verify " \
        "<default>" % target.port in queue_show(running.spool)
    assert target.sink.received == []


def test_verify_name_accepts_the_name_in_the_certificate(relay_process, tls_sink, pki):
    target = tls_sink()
    forward(relay_process, target, "-j", "--client-tls-verify", pki.ca_file,
            "--client-tls-verify-name", "mx.example.test")
    target.sink.wait_for(1)


def test_verify_name_refuses_another_name(relay_process, tls_sink, pki):
    target = tls_sink()
    running = forward(relay_process, target, "-j", "--client-tls-verify", pki.ca_file,
                      "--client-tls-verify-name", "other.example.test")
    shown = queue_show(running.spool)
    assert ("4.7.5 127.0.0.1:%d: the server certificate is not for other.example.test: it is for "
            "mx.example.test, 127.0.0.1, CN=mx.example.test" % target.port) in shown
    assert target.sink.received == []


def test_verify_name_needs_verify(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mailrelay", "--no-daemon", "--spool-dir", str(tmp_path / "s"),
                             "--client-tls-verify-name", "x.test"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "tls_verify_name (--client-tls-verify-name) needs tls_ca (--client-tls-verify)" in result.stderr


def test_certificate_names_are_matched_as_rfc_6125_says():
    cert = {"subject": ((("commonName", "legacy.test"),),),
            "subjectAltName": (("DNS", "*.example.test"), ("DNS", "mx.other.test"), ("IP Address", "192.0.2.1"))}
    for name in ("a.example.test", "MX.other.test.", "192.0.2.1", "legacy.test"):
        assert name_problem(cert, name) == "", name
    for name in ("example.test", "a.b.example.test", "192.0.2.2", "other.test"):
        assert name_problem(cert, name).startswith("it is for *.example.test"), name


# ---------------------------------------------------------------- SNI
def test_client_tls_server_name_is_sent_in_the_handshake(relay_process, tls_sink):
    target = tls_sink()
    forward(relay_process, target, "-j", "--client-tls-server-name", "smarthost.example.test")
    target.sink.wait_for(1)
    assert target.server_names == ["smarthost.example.test"]


def test_client_tls_server_name_with_implicit_tls(relay_process, tls_sink):
    target = tls_sink(implicit=True)
    forward(relay_process, target, "-b", "--client-tls-server-name", "smtps.example.test")
    target.sink.wait_for(1)
    assert target.server_names == ["smtps.example.test"]


def test_without_a_server_name_an_address_gets_no_sni(relay_process, tls_sink):
    target = tls_sink()
    forward(relay_process, target, "-j")
    target.sink.wait_for(1)
    assert target.server_names == [None]


# ---------------------------------------------------------------- --tls-config
def test_tls_config_caps_the_client_version(relay_process, tls_sink):
    target = tls_sink()
    forward(relay_process, target, "-j", "--tls-config", "-tlsv1.2")
    target.sink.wait_for(1)
    assert target.deliveries[0]["tls"] == "TLSv1.2"


def test_tls_config_minimum_applies_to_the_client(relay_process, tls_sink):
    target = tls_sink(max_version=ssl.TLSVersion.TLSv1_2)
    running = forward(relay_process, target, "-j", "--tls-config", "tlsv1.3")
    assert "4.7.5 127.0.0.1:%d: TLS handshake failed" % target.port in queue_show(running.spool)
    assert target.sink.received == []


# ---------------------------------------------------------------- --client-auth-config
@pytest.fixture
def auth_sink(tls_sink):
    """A sink that offers PLAIN, LOGIN and CRAM-MD5 after STARTTLS; only PLAIN/LOGIN take alice's
    password, so a CRAM-MD5 attempt is visible as a refusal."""
    def start() -> TlsSink:
        target = tls_sink(account=("alice", "s3cret"))
        target.sink.handler.cram_account = ("alice", "a different password")
        return target
    return start


def auth_relay(inprocess_relay, tmp_path, target: TlsSink, config: str):
    secrets = tmp_path / "secrets"
    secrets.write_text("client plain alice s3cret\n")
    relay = inprocess_relay(enable=["forward"], config={
        "forward": {"to": f"127.0.0.1:{target.port}", "client_auth": str(secrets), "client_auth_config": config},
        "queue": {"retry": ["1h"]}})
    assert submit(relay.port, MSG) == (250, "")
    return relay


@pytest.mark.parametrize("config", ["", "x:cram-md5", "m:login,plain", "a:plain;d:cram-md5"])
def test_mechanisms_that_log_in(inprocess_relay, tmp_path, auth_sink, config):
    target = auth_sink()
    auth_relay(inprocess_relay, tmp_path, target, config)
    target.sink.wait_for(1)
    assert target.sink.logins == ["alice"]


@pytest.mark.parametrize("config", ["m:cram-md5,plain", "cram-md5,plain", "x:plain,login", "m:plain;a:cram-md5"])
def test_a_preferred_mechanism_is_the_one_tried(inprocess_relay, tmp_path, auth_sink, config):
    target = auth_sink()
    relay = auth_relay(inprocess_relay, tmp_path, target, config)
    shown = queue_show(relay.spool.directory)
    assert "authentication failed: 535" in shown and "(CRAM-MD5)" in shown
    assert target.sink.received == []


def test_no_allowed_mechanism_defers_saying_so(inprocess_relay, tmp_path, auth_sink):
    target = auth_sink()
    relay = auth_relay(inprocess_relay, tmp_path, target, "x:plain,login,cram-md5")
    assert "offers no AUTH mechanism this account may use (none, after --client-auth-config)" in \
        queue_show(relay.spool.directory)


def test_client_auth_config_parsing():
    assert parse_client_auth_config("") == MechanismPreference()
    policy = parse_client_auth_config("m:cram-md5,plain;x:login")
    assert policy.candidates(("PLAIN", "LOGIN", "CRAM-MD5"), secure=False) == ["CRAM-MD5", "PLAIN"]
    assert policy.candidates(("PLAIN", "LOGIN", "CRAM-MD5"), secure=True) == ["CRAM-MD5", "PLAIN"]
    split = parse_client_auth_config("M:;A:LOGIN,cram-sha1")
    assert split.candidates(("PLAIN", "LOGIN", "CRAM-MD5"), secure=False) == []
    assert split.candidates(("PLAIN", "LOGIN", "CRAM-MD5"), secure=True) == ["LOGIN"]
    for bad, message in (("q:plain", "'q:plain' is not m:, x:, a: or d:"), ("m:pain", "unknown mechanism 'pain'")):
        with pytest.raises(ConfigError, match=message):
            parse_client_auth_config(bad)


def test_client_auth_config_needs_client_auth(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mailrelay", "--no-daemon", "--spool-dir", str(tmp_path / "s"),
                             "--client-auth-config", "m:plain"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "client_auth_config (--client-auth-config) needs client_auth (--client-auth)" in result.stderr


# ---------------------------------------------------------------- option forms
def parsed(*args: str):
    ctx = cli.make_context("relay", expand_options_file(list(args)))
    settings, _, _ = load(None, {k: v for k, v in ctx.params.items() if k != "config"})
    return settings


def test_the_options_map_onto_forward_keys(tmp_path, pki, monkeypatch):
    monkeypatch.delenv("MAILRELAY_CONFIG", raising=False)
    secrets = tmp_path / "secrets"
    secrets.write_text("client plain alice s3cret\n")
    monkeypatch.chdir(tmp_path)
    forward = parsed("-b", "--client-tls-required", "--client-tls-certificate", "client.pem",
                     "--client-tls-verify", "<default>", "--client-tls-verify-name", "mx.test",
                     "--client-tls-server-name", "sni.test", "-C", "secrets",
                     "--client-auth-config", "m:plain").extra["forward"]
    assert (forward.tls, forward.tls_connection, forward.tls_ca, forward.tls_verify_name, forward.tls_server_name,
            forward.client_auth_config) == ("required", True, "<default>", "mx.test", "sni.test", "m:plain")
    assert forward.tls_certificate == str(tmp_path / "client.pem")  # absolute: the daemon changes directory
    assert forward.client_auth == str(secrets)
    assert parsed("-j").extra["forward"] == parsed("--client-tls").extra["forward"]
    assert parsed("-j", "--client-tls-required").extra["forward"].tls == "required"
    two = parsed("--client-tls-certificate", "k.pem", "--client-tls-certificate", "c.pem").extra["forward"]
    assert (two.tls_key, two.tls_certificate) == (str(tmp_path / "k.pem"), str(tmp_path / "c.pem"))
    with pytest.raises(ConfigError, match="cannot be used more than twice"):
        parsed(*["--client-tls-certificate", "x.pem"] * 3)


def test_an_emailrelay_options_file_with_client_tls_options(tmp_path, pki, monkeypatch):
    monkeypatch.delenv("MAILRELAY_CONFIG", raising=False)
    options = tmp_path / "emailrelay.conf"
    options.write_text(f"client-tls\nclient-tls-certificate {pki.client_pem}\nclient-tls-verify {pki.ca_file}\n"
                       "client-tls-verify-name mx.example.test\nclient-tls-server-name sni.example.test\n")
    forward = parsed(str(options)).extra["forward"]
    assert (forward.tls, forward.tls_certificate, forward.tls_ca, forward.tls_verify_name,
            forward.tls_server_name) == ("opportunistic", pki.client_pem, pki.ca_file, "mx.example.test",
                                         "sni.example.test")
