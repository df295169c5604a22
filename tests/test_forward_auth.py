"""Forwarding to a smarthost that wants STARTTLS and AUTH, with an E-MailRelay secrets file."""

from __future__ import annotations

import smtplib
import ssl

import pytest
import trustme

from conftest import free_port
from mailrelay.config.loader import ConfigError
from mailrelay.cram_md5 import hashed_secret
from mailrelay.secrets import client_account, client_accounts, read_secrets
from sinks import Sink
from test_forward import MSG, wait_until


@pytest.fixture(scope="module")
def server_tls():
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1", common_name="localhost")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    return context


@pytest.fixture
def smarthost(server_tls):
    sinks = []

    def start(account=("alice", "s3cret pw")):
        sink = Sink(free_port(), tls_context=server_tls, account=account).start()
        sinks.append(sink)
        return sink

    yield start
    for sink in sinks:
        sink.stop()


def test_secrets_file_formats(tmp_path):
    secrets = tmp_path / "secrets"
    secrets.write_text("# accounts\nclient plain alice my+20secret\n"
                       "server plain:b Ym9i c2VjcmV0\nserver none 192.168.0.0/24 localnet\n")
    parsed = read_secrets(secrets)
    assert [(s.side, s.kind, s.name, s.secret) for s in parsed] == [
        ("client", "plain", "alice", "my secret"), ("server", "plain", "bob", "secret"),
        ("server", "none", "192.168.0.0/24", "localnet")]
    account = client_account(secrets)
    assert (account.name, account.secret, account.kind) == ("alice", "my secret", "plain")
    secrets.write_text("client bogus alice x\n")
    with pytest.raises(ConfigError, match=r"secrets:1: unknown secret type"):
        read_secrets(secrets)


def test_forwarding_with_starttls_and_auth(inprocess_relay, smarthost, tmp_path):
    target = smarthost()
    secrets = tmp_path / "secrets"
    secrets.write_text("client plain alice s3cret+20pw\n")
    relay = inprocess_relay(enable=["forward"], config={
        "forward": {"to": f"127.0.0.1:{target.port}", "client_auth": str(secrets), "tls": "required"}})
    with smtplib.SMTP("127.0.0.1", relay.port) as client:
        client.sendmail("a@example.test", ["x@far.test"], MSG)
    [got] = target.wait_for(1)
    assert got.recipients == ["x@far.test"] and target.logins == ["alice"]


def test_wrong_password_defers_and_says_why(inprocess_relay, smarthost, tmp_path):
    target = smarthost()
    secrets = tmp_path / "secrets"
    secrets.write_text("client plain alice wrong\n")
    relay = inprocess_relay(enable=["forward"], config={
        "forward": {"to": f"127.0.0.1:{target.port}", "client_auth": str(secrets)}, "queue": {"retry": ["1h"]}})
    with smtplib.SMTP("127.0.0.1", relay.port) as client:
        client.sendmail("a@example.test", ["x@far.test"], MSG)
    retry = wait_until(lambda: list(relay.spool.directory.glob("*.retry")), what="a deferral")
    assert "authentication failed: 535" in retry[0].read_text()
    assert target.received == []


def test_tls_required_refuses_a_hop_without_starttls(inprocess_relay, tmp_path):
    plain = Sink(free_port()).start()
    try:
        relay = inprocess_relay(enable=["forward"], config={
            "forward": {"to": f"127.0.0.1:{plain.port}", "tls": "required"}, "queue": {"retry": ["1h"]}})
        with smtplib.SMTP("127.0.0.1", relay.port) as client:
            client.sendmail("a@example.test", ["x@far.test"], MSG)
        retry = wait_until(lambda: list(relay.spool.directory.glob("*.retry")), what="a deferral")
        assert "does not offer STARTTLS and TLS is required" in retry[0].read_text()
        assert plain.received == []
    finally:
        plain.stop()


def test_forwarding_with_an_emailrelay_md5_secret_uses_cram_md5(inprocess_relay, smarthost, tmp_path):
    target = smarthost(account=("carol", "carols password"))
    secrets = tmp_path / "secrets"
    secrets.write_text(f"client md5 carol {hashed_secret('carols password')}\n")  # as emailrelay-passwd prints
    relay = inprocess_relay(enable=["forward"], config={
        "forward": {"to": f"127.0.0.1:{target.port}", "client_auth": str(secrets)}})
    with smtplib.SMTP("127.0.0.1", relay.port) as client:
        client.sendmail("a@example.test", ["x@far.test"], MSG)
    target.wait_for(1)
    assert target.logins == ["carol"]


def test_a_filter_chooses_the_client_account_by_selector(inprocess_relay, smarthost, tmp_path):
    # E-MailRelay's fifth field: a filter writes ClientAccountSelector, the client logs in as that line.
    target = smarthost(account=("alice", "s3cret pw"))
    secrets = tmp_path / "secrets"
    secrets.write_text("client plain bob not+20alice   # no selector: the default account\n"
                       "client plain alice s3cret+20pw use_alice\n"
                       "client plain:b = = noauth      # selector 'noauth': no authentication\n")
    selector = tmp_path / "selector.sh"
    selector.write_text("#!/bin/sh\n"
                        "sel=$(sed -n 's/^Subject: account \\(.*\\)\\r$/\\1/p' \"$1\")\n"
                        "[ -n \"$sel\" ] && sed -i \"s/^X-MailRelay-ClientAccountSelector: .*/"
                        "X-MailRelay-ClientAccountSelector: $sel\\r/\" \"$2\"\n"
                        "exit 0\n")
    selector.chmod(0o755)
    relay = inprocess_relay(enable=["forward", "filters"], config={
        "forward": {"to": f"127.0.0.1:{target.port}", "client_auth": str(secrets)},
        "filters": {"server": [str(selector)]}, "queue": {"retry": ["1h"]}})
    for subject in ("account use_alice", "account missing", "no selector"):
        with smtplib.SMTP("127.0.0.1", relay.port) as client:
            client.sendmail("a@example.test", ["x@far.test"], MSG.replace(b"Subject: forward me",
                                                                           f"Subject: {subject}".encode()))
    [got] = target.wait_for(1)
    assert got.message["Subject"] == "account use_alice" and target.logins == ["alice"]
    retries = wait_until(lambda: len(list(relay.spool.directory.glob("*.retry"))) == 2
                         and [p.read_text() for p in relay.spool.directory.glob("*.retry")], what="two deferrals")
    joined = "\n".join(retries)
    assert "no 'client' line with account selector 'missing'" in joined   # unknown selector
    assert "authentication failed: 535" in joined                         # bob, the default, is refused
    accounts = client_accounts(secrets)
    assert sorted(accounts) == ["", "noauth", "use_alice"] and not accounts["noauth"].authenticates
