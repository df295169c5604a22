"""The four example deployments in examples/ (home-server, archive, gateway, ci-sink), each run as an
operator runs it: `relay --no-daemon -c examples/NAME/relay.conf`, with its ``${ENV:-default}``
settings pointed at free loopback ports and temporary directories, and exercised end to end with
real peers (smtplib, poplib, a real spamd, an SMTP sink, an HTTP webhook receiver, dkimpy)."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import poplib
import re
import signal
import smtplib
import ssl
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Iterator

import dkim
import pytest
import trustme

from admin_support import Http
from conftest import ROOT, free_port, wait_for_port, wait_until
from spamd import GTUBE, spamd  # noqa: F401 (fixture)

EXAMPLES = ROOT / "examples"
RELAY = Path(sys.executable).with_name("relay")  # the console script, installed next to this Python
PASSWORD = "correct horse battery"


def message(subject: str, body: str = "Hello.", sender: str = "carol@outside.test",
            to: str = "alice@example.com") -> bytes:
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\nDate: Wed, 25 Nov 2026 12:00:00 +0000\r\n"
            f"Message-ID: <{hashlib.sha1(subject.encode()).hexdigest()}@outside.test>\r\n\r\n{body}\r\n").encode()


@dataclass
class ExampleRelay:
    """One example running as a `relay` process."""

    proc: subprocess.Popen
    log_path: Path
    env: dict[str, str]

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Another `relay` command with the same environment (as an operator's shell has it)."""
        return subprocess.run([str(RELAY), *args], capture_output=True, text=True, timeout=60,
                              env={**os.environ, **self.env})


@pytest.fixture
def run_example(tmp_path: Path) -> Iterator[Callable[..., ExampleRelay]]:
    """Factory: start examples/NAME/relay.conf with ``env``; wait for ``ports``; stopped at teardown."""
    started: list[ExampleRelay] = []

    def start(name: str, env: dict[str, str], ports: list[int]) -> ExampleRelay:
        assert RELAY.exists(), f"{RELAY} missing: install the project (pip install -e .)"
        log_path = tmp_path / f"{name}.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen([str(RELAY), "--no-daemon", "-c", str(EXAMPLES / name / "relay.conf")],
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env={**os.environ, **env})
        relay = ExampleRelay(proc, log_path, env)
        started.append(relay)
        try:
            for port in ports:
                wait_for_port(port, proc)
        except (RuntimeError, TimeoutError) as e:
            pytest.fail(f"{name}: {e}\n{relay.log}")
        return relay

    yield start
    for relay in started:
        if relay.proc.poll() is None:
            relay.proc.send_signal(signal.SIGTERM)
            try:
                relay.proc.wait(20)
            except subprocess.TimeoutExpired:
                relay.proc.kill()
                relay.proc.wait()


@dataclass
class WebhookReceiver:
    """An HTTP endpoint on loopback that records each POST (headers and raw body) and answers 204."""

    server: ThreadingHTTPServer
    posts: list[tuple[dict[str, str], bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/mail"

    def events(self, secret: bytes) -> list[dict]:
        """The events whose X-Relay-Signature verifies (README "Webhooks"); others are dropped."""
        found = []
        for headers, body in list(self.posts):
            expected = hmac.new(secret, headers["X-Relay-Timestamp"].encode() + b"." + body, hashlib.sha256)
            if hmac.compare_digest(expected.hexdigest(), headers.get("X-Relay-Signature", "")):
                found.append(json.loads(body))
        return found


@pytest.fixture
def webhook_receiver() -> Iterator[WebhookReceiver]:
    posts: list[tuple[dict[str, str], bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            posts.append((dict(self.headers.items()), body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, name="webhook-receiver", daemon=True)
    thread.start()
    yield WebhookReceiver(server, posts)
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[trustme.CA, Path]:
    """A CA and a server certificate for 127.0.0.1 in one PEM file (key and chain), as [tls] takes it."""
    authority = trustme.CA()
    pem = tmp_path_factory.mktemp("certs") / "relay.pem"
    authority.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(str(pem))
    return authority, pem


def token_for(relay_env: dict[str, str], name: str, example: str) -> str:
    """`relay token create NAME -c examples/EXAMPLE/relay.conf`: the token is the one line on stdout."""
    done = subprocess.run([str(RELAY), "token", "create", name, "-c", str(EXAMPLES / example / "relay.conf")],
                          capture_output=True, text=True, timeout=60, env={**os.environ, **relay_env})
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


# ---------------------------------------------------------------- every example
@pytest.mark.parametrize("name, port", [("home-server", 25), ("archive", 25), ("gateway", 25), ("ci-sink", 1025)])
def test_each_example_is_valid_with_its_production_defaults(name, port):
    """`relay check-config` accepts each file with nothing set but the one required secret."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "MAILRELAY_WEBHOOK_SECRET": "set-by-the-operator"}
    done = subprocess.run([str(RELAY), "check-config", str(EXAMPLES / name / "relay.conf")],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    assert f"SMTP port {port}" in done.stdout and "spool /var/lib/mailrelay/" in done.stdout
    assert (EXAMPLES / name / "README.md").is_file()


# ---------------------------------------------------------------- home mail server
def test_home_server_spam_pop3_and_relay_control(run_example, spamd, sink, ca, tmp_path):  # noqa: F811
    """Clean mail reaches alice's POP3 mailbox, GTUBE is refused by spamd, strangers cannot relay,
    and alice's own mail goes out through the smarthost after STARTTLS and AUTH."""
    authority, pem = ca
    smarthost = sink()
    secrets = tmp_path / "secrets"
    secrets.write_text(f"server plain alice {PASSWORD.replace(' ', '+20')}\n")
    smtp_port, pop_port, pops_port = free_port(), free_port(), free_port()
    env = {"MAILRELAY_SMTP_PORT": str(smtp_port), "MAILRELAY_POP_PORT": str(pop_port),
           "MAILRELAY_POPS_PORT": str(pops_port), "MAILRELAY_INTERFACE": "127.0.0.1",
           "MAILRELAY_SPOOL": str(tmp_path / "spool"), "MAILRELAY_MAIL_DIR": str(tmp_path / "mail"),
           "MAILRELAY_SECRETS": str(secrets), "MAILRELAY_TLS_CERT": str(pem), "MAILRELAY_SPAMD": spamd.address,
           "MAILRELAY_VERIFIER": str(EXAMPLES / "home-server" / "verify-mailbox"),
           "MAILRELAY_FORWARD_TO": f"127.0.0.1:{smarthost.port}",
           # Loopback is the internet here: only this (documentation) network may relay without AUTH.
           "MAILRELAY_RELAY_NETWORKS": "192.0.2.0/24"}
    run_example("home-server", env, [smtp_port, pop_port, pops_port])
    context = ssl.create_default_context()
    authority.configure_trust(context)

    with smtplib.SMTP("127.0.0.1", smtp_port, timeout=30) as client:  # a stranger's MTA
        assert client.sendmail("carol@outside.test", ["alice@example.com"], message("lunch on friday")) == {}
        with pytest.raises(smtplib.SMTPDataError) as spam:
            client.sendmail("carol@outside.test", ["alice@example.com"], message("offer", GTUBE))
        assert spam.value.smtp_code == 550 and b"Message looks like spam" in spam.value.smtp_error
        client.mail("carol@outside.test")
        assert client.rcpt("nobody@example.com") == (550, b"5.1.1 no such mailbox: nobody@example.com")
        assert client.rcpt("bob@far.test") == (550, b"5.7.1 Relaying denied")  # no open relay
        client.rset()

    pop = poplib.POP3("127.0.0.1", pop_port, timeout=30)
    try:
        pop.stls(context)  # the [tls] certificate serves POP3 too
        pop.user("alice")
        pop.pass_(PASSWORD)
        assert pop.stat()[0] == 1  # the clean message; the spam never arrived
        lines = pop.retr(1)[1]
        assert b"Subject: lunch on friday" in lines and b"Hello." in lines
        pop.dele(1)
    finally:
        pop.quit()
    assert not list((tmp_path / "mail" / "alice" / "new").iterdir()) and not list(
        (tmp_path / "mail" / "alice" / "cur").iterdir())

    with smtplib.SMTP("127.0.0.1", smtp_port, timeout=30) as client:  # alice sends out, as her mail client does
        client.starttls(context=context)
        client.login("alice", PASSWORD)
        assert client.sendmail("alice@example.com", ["bob@far.test"], message("from alice", sender="alice@example.com",
                                                                                to="bob@far.test")) == {}
    [sent] = wait_until(lambda: smarthost.received, what="alice's mail at the smarthost")
    assert sent.recipients == ["bob@far.test"] and sent.message["Subject"] == "from alice"


# ---------------------------------------------------------------- compliance archive
def test_archive_keeps_a_verifiable_copy_of_everything_forwarded(run_example, sink, tmp_path):
    """Forwarded mail is archived first; `relay archive verify` passes, then catches an edited
    message, and with --head a removed last line."""
    mail_server = sink()
    archive = tmp_path / "archive"
    smtp_port = free_port()
    env = {"MAILRELAY_SMTP_PORT": str(smtp_port), "MAILRELAY_INTERFACE": "127.0.0.1",
           "MAILRELAY_SPOOL": str(tmp_path / "spool"), "MAILRELAY_ARCHIVE_DIR": str(archive),
           "MAILRELAY_FORWARD_TO": f"127.0.0.1:{mail_server.port}"}
    relay = run_example("archive", env, [smtp_port])
    with smtplib.SMTP("127.0.0.1", smtp_port, timeout=30) as client:
        client.sendmail("carol@outside.test", ["alice@example.com"], message("contract", "Signed copy attached."))
        client.sendmail("carol@outside.test", ["bob@example.com"], message("invoice", "Due in 30 days."))
    wait_until(lambda: len(mail_server.received) == 2, what="both messages at the mail server")
    assert sorted(r.message["Subject"] for r in mail_server.received) == ["contract", "invoice"]

    index = (archive / "index.jsonl").read_text().splitlines()
    assert [json.loads(line)["recipients"] for line in index] == [["alice@example.com"], ["bob@example.com"]]
    for line in index:  # what was archived is what was forwarded
        stored = (archive / f"{json.loads(line)['sha256']}.eml").read_bytes()
        assert any(r.content.replace(b"\r\n", b"\n").rstrip() in stored.replace(b"\r\n", b"\n")
                   for r in mail_server.received)
    heads = re.findall(r"filter=archive: archived sha256=\w+ chain=(\w+)", relay.log)
    assert len(heads) == 2

    verified = relay.cli("archive", "verify", str(archive), "--head", heads[-1])
    assert verified.returncode == 0 and "intact: 2 message(s)" in verified.stdout, verified.stdout

    first = archive / f"{json.loads(index[0])['sha256']}.eml"
    original = first.read_bytes()
    first.chmod(0o644)  # what an intruder does (the relay stored it read-only)
    first.write_bytes(original.replace(b"Signed copy attached.", b"Unsigned draft only."))
    broken = relay.cli("archive", "verify", str(archive))
    assert broken.returncode == 1 and "BROKEN" in broken.stdout and "was modified" in broken.stdout

    first.write_bytes(original)
    (archive / "index.jsonl").write_text(index[0] + "\n")  # the last line removed: only --head notices
    assert relay.cli("archive", "verify", str(archive)).returncode == 0
    truncated = relay.cli("archive", "verify", str(archive), "--head", heads[-1])
    assert truncated.returncode == 1 and "no line has the recorded hash" in truncated.stdout


# ---------------------------------------------------------------- transactional gateway
def test_gateway_json_api_dkim_webhooks_and_metrics(run_example, sink, webhook_receiver, tmp_path):
    """A JSON message POSTed with a `relay token create` token arrives DKIM-signed (dkimpy verifies
    it against the keygen record); the app hears message.delivered; /metrics counts it."""
    receiving_mx = sink()
    keygen = subprocess.run([str(RELAY), "dkim", "keygen", "--selector", "mail", "--domain", "example.com",
                             "--out", str(tmp_path / "keys")], capture_output=True, text=True, timeout=60)
    assert keygen.returncode == 0, keygen.stderr
    record = re.search(r"^record value: (.*)$", keygen.stdout, re.M).group(1)
    smtp_port, admin_port = free_port(), free_port()
    secret = "webhook-secret-for-the-app"
    env = {"MAILRELAY_SMTP_PORT": str(smtp_port), "MAILRELAY_ADMIN_LISTEN": f"127.0.0.1:{admin_port}",
           "MAILRELAY_SPOOL": str(tmp_path / "spool"),
           "MAILRELAY_DKIM_KEY": str(tmp_path / "keys" / "dkim-example.com-mail.pem"),
           "MAILRELAY_FORWARD_TO": f"127.0.0.1:{receiving_mx.port}",
           "MAILRELAY_WEBHOOK_URL": webhook_receiver.url, "MAILRELAY_WEBHOOK_SECRET": secret}
    token = token_for(env, "shop", "gateway")
    assert token and "\n" not in token
    run_example("gateway", env, [smtp_port, admin_port])
    api = Http(f"http://127.0.0.1:{admin_port}", auth=f"Bearer {token}")

    queued = api.post("/api/v1/messages", {"from": "Shop <orders@example.com>", "to": ["customer@far.test"],
                                           "subject": "Your order 1042", "text": "Thank you for your order."})
    assert queued.status == 202, queued.body
    message_id = queued.json()["id"]

    [got] = wait_until(lambda: receiving_mx.received, what="the message at the receiving MX")
    assert got.recipients == ["customer@far.test"] and got.message["Subject"] == "Your order 1042"
    signature = dkim.util.parse_tag_value(got.message["DKIM-Signature"].encode().replace(b"\r\n", b""))
    assert (signature[b"d"], signature[b"s"]) == (b"example.com", b"mail")
    published = {"mail._domainkey.example.com.": record.encode()}
    assert dkim.verify(got.content, dnsfunc=lambda name, timeout=5: published.get(
        name.decode() if isinstance(name, bytes) else name)), got.content.split(b"\r\n\r\n")[0]

    [delivered] = wait_until(lambda: [e for e in webhook_receiver.events(secret.encode())
                                      if e["event"] == "message.delivered"], what="message.delivered")
    assert delivered["message_id"] == message_id and delivered["data"]["recipient"] == "customer@far.test"

    metrics = api.get("/metrics")
    assert metrics.status == 200 and re.search(rb"^mailrelay_messages_delivered_total 1\.0$", metrics.body, re.M)
    assert api.get("/metrics", auth=False).status == 401  # metrics need the token too


# ---------------------------------------------------------------- SMTP sink for CI
def test_ci_sink_keeps_everything_for_inspection_and_forwards_nothing(run_example, tmp_path):
    """Mail from smtplib stays queued (nothing forwards it) and is readable through the API and a maildir."""
    mail = tmp_path / "mail"
    for sub in ("tmp", "new", "cur"):
        (mail / "inbox" / sub).mkdir(parents=True)  # README: a maildir gets a copy of every message
    smtp_port, admin_port = free_port(), free_port()
    env = {"MAILRELAY_SMTP_PORT": str(smtp_port), "MAILRELAY_ADMIN_LISTEN": f"127.0.0.1:{admin_port}",
           "MAILRELAY_SPOOL": str(tmp_path / "spool"), "MAILRELAY_MAIL_DIR": str(mail)}
    token = token_for(env, "ci", "ci-sink")
    run_example("ci-sink", env, [smtp_port, admin_port])

    raw = (b"From: app@example.test\r\nTo: someone@anywhere.test, other@elsewhere.test\r\n"
           b"Subject: password reset\r\n\r\nYour code is 314159.\r\n")
    with smtplib.SMTP("127.0.0.1", smtp_port, timeout=30) as client:
        assert client.sendmail("app@example.test", ["someone@anywhere.test", "other@elsewhere.test"], raw) == {}

    api = Http(f"http://127.0.0.1:{admin_port}", auth=f"Bearer {token}")
    listing = api.get("/api/v1/queue").json()
    [row] = listing["messages"]
    assert row["recipients"] == ["someone@anywhere.test", "other@elsewhere.test"]
    assert row["subject"] == "password reset" and row["state"] == "ready"  # kept, never forwarded
    content = api.get(f"/api/v1/queue/{row['id']}/raw")
    assert content.status == 200 and content.headers.get_content_type() == "message/rfc822"
    assert content.body.endswith(b"Subject: password reset\r\n\r\nYour code is 314159.\r\n")
    assert re.search(rb"(?m)^Message-ID: <", content.body)  # msgid: gave it one
    [copy] = list((mail / "inbox" / "new").iterdir())
    assert copy.read_bytes() == content.body
