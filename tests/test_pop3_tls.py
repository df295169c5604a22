"""POP3 and TLS (RFC 2595): STLS with the relay's server certificate, POP3S, and where passwords
may be sent: under TLS, from loopback (unless ``loopback_is_secure = false``), or where the
operator allows plaintext; ``--server-tls-required`` refuses every login before TLS."""

from __future__ import annotations

import poplib
import ssl
from pathlib import Path

import pytest
import trustme

from conftest import free_port
from mailrelay_sdk.testing import RunningRelay
from test_pop3_protocol import MESSAGES, PLAINTEXT, Pop, pop3  # noqa: F401  (pop3: the fixture)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> tuple[Path, trustme.CA]:
    directory = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1", common_name="localhost")
    leaf.private_key_and_cert_chain_pem.write_to_path(str(directory / "server.pem"))
    return directory / "server.pem", ca


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def tls_pop3(pop3, certs, required: bool = False, **settings):
    pem, _ = certs
    return pop3(tls={"starttls": True, "certificate": str(pem), "required": required}, **settings)


def upgrade(client: Pop, ca: trustme.CA) -> Pop:
    """STLS on a raw client: the reply, then a handshake on the same socket."""
    assert client.cmd("STLS") == "+OK Begin TLS negotiation"
    assert client.buf == b""
    client.sock = client_context(ca).wrap_socket(client.sock, server_hostname="localhost")
    return client


def capabilities(client: Pop) -> list[str]:
    return client.multi("CAPA")[1].decode().split("\r\n")[:-1]


def test_stls_is_offered_and_logins_work_over_it(pop3, certs):
    relay = tls_pop3(pop3, certs)
    relay.deliver(MESSAGES[0])
    client = poplib.POP3("127.0.0.1", relay.port, timeout=10)
    assert "STLS" in client.capa()
    client.stls(context=client_context(certs[1]))
    assert "STLS" not in client.capa()  # once is enough
    client.user("alice")
    assert client.pass_("alice-pw").startswith(b"+OK 1 messages")
    assert b"\r\n".join(client.retr(1)[1]) + b"\r\n" == MESSAGES[0]
    client.quit()


def test_stls_twice_or_after_login_is_refused(pop3, certs):
    relay = tls_pop3(pop3, certs)
    client = upgrade(relay.connect(), certs[1])
    assert client.cmd("STLS") == "-ERR Already using TLS"
    client.login()
    assert client.cmd("STLS").startswith("-ERR STLS is not valid in the TRANSACTION state")


def test_commands_sent_in_clear_after_stls_are_discarded(pop3, certs):
    relay = tls_pop3(pop3, certs)
    client = relay.connect()
    client.send("STLS\r\nUSER alice\r\n")  # an attacker's injection rides along in clear text
    assert client.line() == "+OK Begin TLS negotiation"
    client.sock = client_context(certs[1]).wrap_socket(client.sock, server_hostname="localhost")
    assert client.cmd("PASS alice-pw") == "-ERR USER first"


def test_without_tls_a_network_client_may_not_send_a_password(pop3, certs):
    relay = tls_pop3(pop3, certs, loopback_is_secure=False)  # loopback treated like any network
    client = relay.connect()
    before = capabilities(client)
    assert "STLS" in before and "USER" not in before and "SASL PLAIN" not in before
    assert client.cmd("USER alice") == PLAINTEXT
    assert client.cmd("AUTH PLAIN AGFsaWNlAGFsaWNlLXB3") == PLAINTEXT
    assert client.cmd("AUTH") == "+OK" and client.body() == b""  # no mechanism to offer
    upgrade(client, certs[1])
    after = capabilities(client)
    assert "USER" in after and "SASL PLAIN" in after and "STLS" not in after
    assert client.login().startswith("+OK 0 messages")


def test_the_operator_may_allow_plaintext_logins(pop3):
    relay = pop3(loopback_is_secure=False, allow_plaintext=True)
    assert relay.connect().login().startswith("+OK 0 messages")


def test_without_a_certificate_a_network_client_cannot_log_in_with_a_password(pop3):
    relay = pop3(loopback_is_secure=False)
    client = relay.connect()
    assert "STLS" not in capabilities(client)
    assert client.cmd("USER alice") == PLAINTEXT
    assert client.cmd("STLS") == "-ERR STLS not available"


def test_tls_required_refuses_logins_before_stls_even_from_loopback(pop3, certs):
    relay = tls_pop3(pop3, certs, required=True)
    client = relay.connect()
    assert "USER" not in capabilities(client)
    assert client.cmd("USER alice") == PLAINTEXT
    assert client.cmd("APOP alice 0123456789abcdef0123456789abcdef") == PLAINTEXT
    upgrade(client, certs[1])
    assert client.login().startswith("+OK")


def test_pop3s_speaks_tls_from_the_first_byte(pop3, certs):
    relay = tls_pop3(pop3, certs, tls_port=free_port(), loopback_is_secure=False)
    relay.deliver(MESSAGES[1])
    client = poplib.POP3_SSL("127.0.0.1", relay.tls_port, context=client_context(certs[1]), timeout=10)
    assert "STLS" not in client.capa() and "USER" in client.capa()
    client.user("alice")
    assert client.pass_("alice-pw").startswith(b"+OK 1 messages")
    assert b"\r\n".join(client.retr(1)[1]) + b"\r\n" == MESSAGES[1]
    client.quit()


def test_pop3s_without_a_certificate_is_a_start_up_error(tmp_path):
    secrets = tmp_path / "pop.secrets"
    secrets.write_text("server plain alice pw\n")
    relay = RunningRelay(tmp_path / "spool", enable=["pop3"],
                         config={"pop3": {"port": 0, "tls_port": free_port(), "auth": str(secrets)}})
    with pytest.raises(Exception, match="tls_port: POP3S needs a server certificate"):
        relay.start()
