"""SMTP AUTH on the wire (RFC 4954): the exchanges, the replies, and that plugins decide everything.

A small plugin here plays the authentication backend, so these tests are about the protocol; the
`auth` plugin's secrets files, PAM and throttling are tested in test_auth_backends.py and, over
the wire with swaks, in test_auth_end_to_end.py.
"""

from __future__ import annotations

import base64
import hmac
import smtplib
import socket

import pytest

from mailrelay.spool import Spool
from mailrelay_sdk import Verdict, hookimpl

MSG = b"From: alice@example.test\r\nSubject: auth\r\n\r\nhi\r\n"


class Backend:
    """alice/secret; CRAM-MD5 against the same password; "locked" is thrown out."""

    def __init__(self, mechanisms=("PLAIN", "LOGIN", "CRAM-MD5")):
        self.mechanisms = list(mechanisms)
        self.calls: list[tuple[str, str]] = []

    @hookimpl
    def auth_mechanisms(self, session):
        return self.mechanisms

    @hookimpl
    def on_auth(self, session, mechanism, username, password, challenge, response):
        self.calls.append((mechanism, username))
        if username == "locked":
            return Verdict.disconnect("Too many failures", code=421, enhanced="4.7.0")
        if mechanism == "CRAM-MD5":
            good = hmac.compare_digest(hmac.new(b"secret", challenge.encode(), "md5").hexdigest(), response)
        else:
            good = password == "secret"
        if username == "alice" and good:
            return Verdict.ok("Authentication successful", code=235, enhanced="2.7.0")
        return Verdict.deny("Authentication credentials invalid", code=535, enhanced="5.7.8")


class Wire:
    """A raw client: one line out, one (multi-line) reply back."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("rb")
        self.greeting = self.reply()

    def reply(self) -> str:
        lines = []
        while True:
            line = self.file.readline().decode()
            if not line:
                return "".join(lines) or "<closed>"
            lines.append(line)
            if line[3:4] != "-":
                return "".join(lines)

    def say(self, line: str) -> str:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply()


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.fixture
def relay(inprocess_relay):
    backend = Backend()
    running = inprocess_relay(plugins={"backend": backend})
    running.backend = backend
    return running


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
def test_each_mechanism_authenticates_with_smtplib(relay, mechanism):
    with smtplib.SMTP("127.0.0.1", relay.port) as client:
        client.ehlo()
        assert client.esmtp_features["auth"].split() == ["PLAIN", "LOGIN", "CRAM-MD5"]
        client.user, client.password = "alice", "secret"
        code, _ = client.auth(mechanism, getattr(client, "auth_" + mechanism.lower().replace("-", "_")))
        assert code == 235
        client.sendmail("alice@example.test", ["bob@example.test"], MSG)
    spool = Spool(relay.spool.directory)
    (message_id,) = spool.ids()
    assert spool.read_envelope(message_id).authentication == "alice"   # X-MailRelay-Authentication
    assert relay.backend.calls == [(mechanism, "alice")]


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
def test_wrong_credentials_get_535_and_the_session_goes_on(relay, mechanism):
    with smtplib.SMTP("127.0.0.1", relay.port) as client:
        client.ehlo()
        client.user, client.password = "alice", "wrong"
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            client.auth(mechanism, getattr(client, "auth_" + mechanism.lower().replace("-", "_")))
        assert refused.value.smtp_code == 535
        assert client.noop()[0] == 250


def test_no_auth_plugin_means_no_auth(inprocess_relay):
    relay = inprocess_relay()
    wire = Wire(relay.port)
    assert "AUTH" not in wire.say("EHLO client.test")
    assert wire.say("AUTH PLAIN " + b64("\0alice\0secret")).startswith("502 5.5.1")


def test_a_mechanism_not_offered_is_refused(inprocess_relay):
    backend = Backend(mechanisms=["PLAIN"])
    relay = inprocess_relay(plugins={"backend": backend})
    wire = Wire(relay.port)
    assert "250-AUTH PLAIN\r\n" in wire.say("EHLO client.test")
    assert wire.say("AUTH CRAM-MD5").startswith("504 5.5.4")
    assert backend.calls == []


def test_auth_rules_of_rfc_4954(relay):
    wire = Wire(relay.port)
    assert wire.say("AUTH PLAIN " + b64("\0alice\0secret")).startswith("503")       # EHLO first
    wire.say("EHLO client.test")
    assert wire.say("AUTH LOGIN").startswith("334 ")
    assert wire.say("*").startswith("501")                                            # cancelled
    assert wire.say("AUTH PLAIN not-base64!").startswith("501")
    assert wire.say("MAIL FROM:<alice@example.test>").startswith("250")
    assert wire.say("AUTH PLAIN " + b64("\0alice\0secret")).startswith("503 5.5.1")   # in a transaction
    wire.say("RSET")
    assert wire.say("AUTH PLAIN " + b64("\0alice\0secret")).startswith("235")
    assert wire.say("AUTH PLAIN " + b64("\0alice\0secret")).startswith("503")         # already


def test_a_disconnect_verdict_closes_the_session(relay):
    wire = Wire(relay.port)
    wire.say("EHLO client.test")
    assert wire.say("AUTH PLAIN " + b64("\0locked\0x")).startswith("421 4.7.0")
    assert wire.reply() == "<closed>"


def test_cram_md5_challenges_are_fresh(relay):
    challenges = set()
    for _ in range(3):
        wire = Wire(relay.port)
        wire.say("EHLO client.test")
        reply = wire.say("AUTH CRAM-MD5")
        assert reply.startswith("334 ")
        challenges.add(base64.b64decode(reply[4:].strip()))
    assert len(challenges) == 3 and all(c.startswith(b"<") and c.endswith(b">") for c in challenges)


def test_plain_with_another_authorization_identity_is_refused(relay):
    wire = Wire(relay.port)
    wire.say("EHLO client.test")
    assert wire.say("AUTH PLAIN " + b64("bob\0alice\0secret")).startswith("535 5.7.8")
    assert wire.say("AUTH PLAIN " + b64("alice\0alice\0secret")).startswith("235")   # the same: fine
    assert relay.backend.calls == [("PLAIN", "alice")]
