"""DKIM signing (the ``dkim-sign`` plugin) and ``relay dkim keygen``: what mailrelay signs must
verify with implementations we did not write (Perl's Mail::DKIM through our dnsmasq, OpenDKIM),
only our own mail is signed, and no attempt ever doubles a signature."""

from __future__ import annotations

import logging
import os
import re
import smtplib
import stat
import subprocess
import sys
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization

from conftest import dnsmasq_serving, free_port, submit, wait_until
from mailauth_peers import mail_dkim_sign, mail_dkim_verify, new_key, opendkim_verify, send_as, txt_option
from mailrelay_plugins.mailauth.keys import txt_record
from sinks import Behaviour

DOMAIN = "sign.test"
MESSAGE = (b"From: Alice <alice@sign.test>\r\nTo: <bob@far.test>\r\nSubject: quarterly report\r\n"
           b"Date: Thu, 01 Jan 2026 00:00:00 +0000\r\nMessage-ID: <report.1@sign.test>\r\n\r\n"
           b"Numbers  are up.\t \r\n\r\nRegards\r\n")


def keygen(*args: str, cwd: Path, umask: int = 0o022) -> subprocess.CompletedProcess[str]:
    old = os.umask(umask)  # the child inherits it
    try:
        return subprocess.run([sys.executable, "-m", "mailrelay", "dkim", "keygen", *args], cwd=cwd,
                              capture_output=True, text=True, timeout=60)
    finally:
        os.umask(old)


def record_of(output: str) -> str:
    found = re.search(r"^record value: (.*)$", output, re.M)
    assert found, output
    return found.group(1)


def signatures(content: bytes) -> list[dict[bytes, bytes]]:
    head = content.split(b"\r\n\r\n", 1)[0].replace(b"\r\n ", b" ").replace(b"\r\n\t", b" ")
    return [dkim.util.parse_tag_value(line.split(b":", 1)[1])
            for line in head.split(b"\r\n") if line.lower().startswith(b"dkim-signature:")]


@pytest.fixture
def signing_domain(tmp_path):
    """Keys for sign.test (RSA s=rsa1, Ed25519 s=ed1) published by a real dnsmasq."""
    rsa_key, rsa_record = new_key(tmp_path / "keys", DOMAIN, "rsa1")
    ed_key, ed_record = new_key(tmp_path / "keys", DOMAIN, "ed1", "ed25519")
    port = free_port()
    records = [txt_option(f"rsa1._domainkey.{DOMAIN}", rsa_record), txt_option(f"ed1._domainkey.{DOMAIN}", ed_record),
               "--host-record=probe.test,127.0.0.1"]
    with dnsmasq_serving(tmp_path, port, records, probe="probe.test", options=["--no-negcache"]):
        yield {"port": port, "rsa": rsa_key, "ed25519": ed_key,
               "records": {f"rsa1._domainkey.{DOMAIN}": rsa_record, f"ed1._domainkey.{DOMAIN}": ed_record},
               "dkim": {"domain": DOMAIN, "selector": "rsa1", "key": str(rsa_key),
                        "ed25519_selector": "ed1", "ed25519_key": str(ed_key)}}


def signing_relay(inprocess_relay, sink_port: int, dkim_config: dict, **extra):
    config = {"dkim": dkim_config, "forward": {"to": f"127.0.0.1:{sink_port}"}, **extra}
    return inprocess_relay(enable=["dkim-sign", "forward"], config=config)


# ---------------------------------------------------------------- keygen
def test_keygen_writes_a_key_only_its_owner_can_read_and_prints_the_record(tmp_path):
    done = keygen("--selector", "mail", "--domain", "Example.TEST", cwd=tmp_path, umask=0)
    assert done.returncode == 0, done.stderr
    path = tmp_path / "dkim-example.test-mail.pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # even with umask 0
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind
    private = serialization.load_pem_private_key(path.read_bytes(), None)
    assert record_of(done.stdout) == txt_record(private)
    assert record_of(done.stdout).startswith("v=DKIM1; k=rsa; p=MII")
    assert private.key_size == 2048
    assert re.search(r'^mail\._domainkey\.example\.test\. IN TXT \( "v=DKIM1; k=rsa; p=\S{200,255}" "\S+" \)$',
                     done.stdout, re.M)
    again = keygen("--selector", "mail", "--domain", "example.test", cwd=tmp_path)
    assert again.returncode == 1 and "not replacing a key" in again.stderr
    assert serialization.load_pem_private_key(path.read_bytes(), None).private_numbers() == private.private_numbers()


def test_keygen_ed25519_into_a_directory(tmp_path):
    done = keygen("-s", "ed1", "-d", "example.test", "--type", "ed25519", "--out", str(tmp_path / "keys"),
                  cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"v=DKIM1; k=ed25519; p=[A-Za-z0-9+/]{43}=", record_of(done.stdout))
    assert 'ed25519_key = "' + str(tmp_path / "keys" / "dkim-example.test-ed1.pem") + '"' in done.stdout
    assert stat.S_IMODE((tmp_path / "keys" / "dkim-example.test-ed1.pem").stat().st_mode) == 0o600


@pytest.mark.parametrize("args, complaint", [
    (["--selector", "../../etc/x", "--domain", "example.test"], "is not a DNS label"),
    (["--selector", "s", "--domain", "example.test", "--bits", "512"], "1024-4096"),
    (["--selector", "s", "--domain", "localhost"], "not a domain name"),
])
def test_keygen_refuses_bad_input(tmp_path, args, complaint):
    done = keygen(*args, cwd=tmp_path)
    assert done.returncode == 2 and complaint in done.stderr
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- what we sign verifies elsewhere
def test_a_key_from_keygen_signs_mail_that_mail_dkim_and_opendkim_verify(tmp_path, inprocess_relay, sink):
    rsa = keygen("-s", "rsa1", "-d", DOMAIN, cwd=tmp_path)
    ed = keygen("-s", "ed1", "-d", DOMAIN, "--type", "ed25519", cwd=tmp_path)
    records = {f"rsa1._domainkey.{DOMAIN}": record_of(rsa.stdout), f"ed1._domainkey.{DOMAIN}": record_of(ed.stdout)}
    port = free_port()
    options = [txt_option(name, value) for name, value in records.items()] + ["--host-record=probe.test,127.0.0.1"]
    with dnsmasq_serving(tmp_path, port, options, probe="probe.test"):
        target = sink()
        relay = signing_relay(inprocess_relay, target.port, {
            "domain": DOMAIN, "selector": "rsa1", "key": str(tmp_path / "dkim-sign.test-rsa1.pem"),
            "ed25519_selector": "ed1", "ed25519_key": str(tmp_path / "dkim-sign.test-ed1.pem")})
        assert submit(relay.port, MESSAGE, sender="alice@sign.test", recipients=["bob@far.test"]) == (250, "")
        (received,) = target.wait_for(1)
        sent = received.content
        # Two signatures, relaxed/relaxed, From oversigned, no l=.
        tags = signatures(sent)
        assert [t[b"a"] for t in tags] == [b"rsa-sha256", b"ed25519-sha256"]
        for t in tags:
            assert t[b"c"] == b"relaxed/relaxed" and t[b"d"] == b"sign.test" and b"l" not in t
            signed = [h.strip().lower() for h in t[b"h"].split(b":")]
            assert signed.count(b"from") == 2 and {b"subject", b"date", b"to", b"message-id"} <= set(signed)
        # Perl's Mail::DKIM, asking our dnsmasq: the RSA signature passes. (This Mail::DKIM,
        # Debian 12's 1.20230212, predates its Ed25519 support and calls that one invalid.)
        result, per_signature = mail_dkim_verify(sent, port)
        assert result == "pass"
        assert "d=sign.test s=rsa1 a=rsa-sha256 result=pass" in per_signature
        # OpenDKIM verifies both, Ed25519 included.
        found = opendkim_verify(sent, records, tmp_path / "opendkim")
        assert len(found) == 2 and all(f.startswith("dkim=pass") for f in found), found
        assert any("header.a=ed25519-sha256" in f for f in found)
        # And a changed body fails with both: the signatures cover what was sent.
        tampered = sent.replace(b"Numbers  are up.", b"Numbers are down.")
        assert mail_dkim_verify(tampered, port)[0] == "fail"
        assert all(f.startswith("dkim=fail") for f in opendkim_verify(tampered, records, tmp_path / "opendkim"))


def test_a_client_filter_edit_is_covered_by_the_signature(inprocess_relay, sink, signing_domain):
    """The signer runs after every client filter, whatever the plugin order says."""
    target = sink()
    relay = inprocess_relay(enable=["dkim-sign", "forward", "filters"], config={
        "dkim": signing_domain["dkim"], "forward": {"to": f"127.0.0.1:{target.port}"},
        "filters": {"client": ["msgid:"]}})
    without_id = MESSAGE.replace(b"Message-ID: <report.1@sign.test>\r\n", b"")
    assert submit(relay.port, without_id, sender="alice@sign.test", recipients=["bob@far.test"]) == (250, "")
    sent = target.wait_for(1)[0].content
    assert re.search(rb"^Message-ID: <", sent, re.M | re.I)  # added by the client filter
    assert b"message-id" in signatures(sent)[0][b"h"]
    assert mail_dkim_verify(sent, signing_domain["port"])[0] == "pass"


# ---------------------------------------------------------------- only our mail is signed
def test_mail_from_a_remote_client_that_did_not_authenticate_is_not_signed(inprocess_relay, sink, signing_domain,
                                                                         caplog):
    target = sink()
    relay = signing_relay(inprocess_relay, target.port, signing_domain["dkim"],
                          server={"proxy_protocol": True}, smtp={"remote_clients": True},
                          relay={"local_domains": ["far.test"]})
    with caplog.at_level(logging.DEBUG, logger="mailrelay.mailauth"):
        assert send_as(relay.port, "203.0.113.9", "alice@sign.test", ["bob@far.test"], MESSAGE)[0] == 250
        sent = target.wait_for(1)[0].content
    assert b"DKIM-Signature" not in sent
    assert "not signed: client 203.0.113.9 neither authenticated nor trusted" in caplog.text


def test_mail_from_an_authenticated_client_is_signed(inprocess_relay, sink, signing_domain, tmp_path):
    secrets = tmp_path / "auth.secrets"
    secrets.write_text("server plain alice s3cret\n")
    target = sink()
    relay = inprocess_relay(enable=["auth", "dkim-sign", "forward"], config={
        "auth": {"server_auth": str(secrets)}, "forward": {"to": f"127.0.0.1:{target.port}"},
        "dkim": {**signing_domain["dkim"], "networks": ["192.0.2.0/24"]}})  # loopback is not trusted here
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as client:
        client.login("alice", "s3cret")
        assert client.sendmail("alice@sign.test", ["bob@far.test"], MESSAGE) == {}
    sent = target.wait_for(1)[0].content
    assert len(signatures(sent)) == 2
    assert mail_dkim_verify(sent, signing_domain["port"])[0] == "pass"


def test_a_domain_without_a_key_passes_unsigned_with_a_log_line(inprocess_relay, sink, signing_domain, caplog):
    target = sink()
    relay = signing_relay(inprocess_relay, target.port, signing_domain["dkim"])
    other = MESSAGE.replace(b"alice@sign.test", b"alice@elsewhere.test")
    with caplog.at_level(logging.INFO, logger="mailrelay.mailauth"):
        assert submit(relay.port, other, sender="alice@elsewhere.test", recipients=["bob@far.test"]) == (250, "")
        sent = target.wait_for(1)[0].content
    assert b"DKIM-Signature" not in sent and sent.endswith(b"Regards\r\n")
    assert "dkim: not signed: no DKIM key for elsewhere.test" in caplog.text


def test_a_subdomain_is_signed_with_its_parent_domains_keys(inprocess_relay, sink, signing_domain):
    target = sink()
    relay = signing_relay(inprocess_relay, target.port, signing_domain["dkim"])
    sub = MESSAGE.replace(b"alice@sign.test", b"alice@news.sign.test")
    assert submit(relay.port, sub, sender="alice@news.sign.test", recipients=["bob@far.test"]) == (250, "")
    sent = target.wait_for(1)[0].content
    assert {t[b"d"] for t in signatures(sent)} == {b"sign.test"}  # aligns with DMARC's relaxed mode
    assert mail_dkim_verify(sent, signing_domain["port"])[0] == "pass"


# ---------------------------------------------------------------- never twice
def test_a_retry_signs_afresh_and_never_twice(inprocess_relay, sink, signing_domain):
    behaviour = Behaviour(refuse={"bob": "451 4.3.0 try again later"})
    target = sink(behaviour)
    relay = signing_relay(inprocess_relay, target.port, signing_domain["dkim"], queue={"retry": ["1s"]})
    assert submit(relay.port, MESSAGE, sender="alice@sign.test", recipients=["bob@far.test"]) == (250, "")
    wait_until(lambda: list(relay.spool.directory.glob("*.retry")), what="a deferred attempt")
    # The spool keeps the message as it was received: the signature lives in what is sent.
    (content_file,) = relay.spool.directory.glob("*.content")
    assert b"DKIM-Signature" not in content_file.read_bytes()
    behaviour.refuse.clear()
    sent = target.wait_for(1, timeout=30)[0].content
    assert [t[b"s"] for t in signatures(sent)] == [b"rsa1", b"ed1"]
    assert mail_dkim_verify(sent, signing_domain["port"])[0] == "pass"


def test_a_valid_signature_of_ours_is_kept_not_repeated(inprocess_relay, sink, signing_domain):
    """A message that already carries our signature (looping back, or signed upstream with our key)
    gets only the signature it lacks."""
    target = sink()
    relay = signing_relay(inprocess_relay, target.port, signing_domain["dkim"])
    presigned = mail_dkim_sign(MESSAGE, DOMAIN, "rsa1", signing_domain["rsa"])
    assert submit(relay.port, presigned, sender="alice@sign.test", recipients=["bob@far.test"]) == (250, "")
    sent = target.wait_for(1)[0].content
    assert sorted(t[b"s"] for t in signatures(sent)) == [b"ed1", b"rsa1"]  # one each
    assert mail_dkim_verify(sent, signing_domain["port"])[0] == "pass"


# ---------------------------------------------------------------- start-up checks
def test_a_key_everybody_can_read_stops_the_relay_at_start_up(tmp_path, signing_domain):
    os.chmod(signing_domain["rsa"], 0o644)
    conf = tmp_path / "relay.conf"
    conf.write_text(f'[dkim]\ndomain = "{DOMAIN}"\nselector = "rsa1"\nkey = "{signing_domain["rsa"]}"\n')
    done = subprocess.run([sys.executable, "-m", "mailrelay", "--no-daemon", "-c", str(conf), "--port",
                           str(free_port()), "--spool-dir", str(tmp_path / "spool")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert f"[dkim] key: the key {signing_domain['rsa']} is readable or writable by every user; chmod 600 it" \
        in done.stderr


@pytest.mark.parametrize("problem", ["wrong type", "no key", "received signed"])
def test_a_bad_signing_setup_stops_start_up_with_a_clear_error(inprocess_relay, signing_domain, problem):
    config = dict(signing_domain["dkim"])
    expected = {"wrong type": "is an rsa key; this setting needs an ed25519 key",
                "no key": "no signing key", "received signed": "received must not be signed"}[problem]
    if problem == "wrong type":
        config["ed25519_key"] = config["key"]
    elif problem == "no key":
        config = {"domain": DOMAIN}
    else:
        config["headers"] = ["from", "subject", "received"]
    with pytest.raises(Exception, match=expected):  # the ConfigError, as the relay_startup hook's failure
        inprocess_relay(enable=["dkim-sign"], config={"dkim": config})


def test_a_dkim_section_enables_the_plugin(tmp_path, signing_domain):
    conf = tmp_path / "relay.conf"
    conf.write_text(f'[dkim]\ndomain = "{DOMAIN}"\nselector = "rsa1"\nkey = "{signing_domain["rsa"]}"\n')
    done = subprocess.run([sys.executable, "-m", "mailrelay", "check-config", str(conf)], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "MAILRELAY_SPOOL": str(tmp_path / "spool")})
    assert done.returncode == 0, done.stderr
    assert "dkim-sign" in done.stdout
