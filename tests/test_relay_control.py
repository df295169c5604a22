"""No open relay: the classic relay tests against a real relay, from a client outside the relay networks.

The relay serves remote clients (``--remote-clients``, bound to 127.0.0.1 only) and is told that no
network may relay (``[relay] networks = []``), so the loopback test client is an outsider.
"""

from __future__ import annotations

import smtplib
from typing import Iterator

import pytest

from conftest import RelayProcess, free_port, wait_for_port
from smtpwire import Wire
from mailrelay.spool import Spool
from mailrelay_plugins.relay_control import RelayPolicy, RelaySettings, hidden_destination
from mailrelay_sdk import Recipient, Session, hookimpl

OUTSIDER_CONF = """
[plugins]
enable = ["relay-control"]

[relay]
local_domains = ["local.test"]
networks = []
"""

# (address inside <...> of RCPT TO, why it must be refused)
REFUSED = [
    ("user@other.test", "another domain"),
    ("user@OTHER.test", "another domain, mixed case"),
    ("user%other.test@local.test", "percent hack"),
    ("user%other.test%relay.test@local.test", "percent hack, two hops"),
    ("@local.test:user@other.test", "source route to another domain"),
    ("@local.test,@relay.test:user@other.test", "source route with two hops"),
    ("other.test!user@local.test", "bang path"),
    ('"user@other.test"@local.test', "quoted local part hiding an address"),
    ('"user%other.test"@local.test', "quoted percent hack"),
    ('"other.test!user"@local.test', "quoted bang path"),
    ('"user\\@other.test"@local.test', "quoted local part with an escaped @"),
    ("user@[10.0.0.1]", "IP literal"),
    ("user@[127.0.0.1]", "IP literal of the relay itself"),
    ("user@[IPv6:::1]", "IPv6 literal"),
    ("user@local.test.", "trailing dot"),
    ("user@other.test.", "trailing dot, another domain"),
    ("user@sub.local.test", "sub-domain of a local domain"),
    ("user@local.test.other.test", "local domain as a prefix"),
    ("user@xn--bcher-kva.test", "IDN of another domain"),
]

ACCEPTED = [
    ("user@local.test", "local domain"),
    ("User@LOCAL.TEST", "local domain, mixed case"),
    ("user@Local.Test", "local domain, mixed case"),
    ("postmaster", "<postmaster> without a domain (RFC 5321 4.5.1)"),
    ("Postmaster", "<postmaster> in any case"),
    ("@other.test:user@local.test", "a source route is ignored: the mail goes to the local user"),
    ("first.last+tag@local.test", "ordinary atext"),
]

# NUL, CR and LF never reach the policy: the SMTP parser refuses them as bad syntax (501).
CONTROL = [
    (b"user\x00@local.test", "NUL in the local part"),
    (b"user@other.test\x00@local.test", "NUL hiding another address"),
    (b"user\r@local.test", "bare CR"),
    (b"user\n@local.test", "bare LF"),
    (b"user@local.test\nRCPT TO:<x@other.test", "LF smuggling a second command"),
    (b'"user\x00"@local.test', "NUL in a quoted local part"),
]


@pytest.fixture(scope="module")
def outsider(tmp_path_factory) -> Iterator[RelayProcess]:
    """One relay for the whole table: remote clients served, nobody may relay."""
    tmp = tmp_path_factory.mktemp("relay-control")
    conf = tmp / "relay.conf"
    conf.write_text(OUTSIDER_CONF)
    port = free_port()
    relay = RelayProcess(["--no-daemon", "--log", "--no-syslog", "--port", str(port), "--spool-dir",
                          str(tmp / "spool"), "--domain", "relay.test", "--remote-clients",
                          "--interface", "127.0.0.1", "-c", str(conf)], tmp / "spool", port, tmp / "relay.log", None)
    wait_for_port(port, relay.proc)
    yield relay
    relay.stop()


def rcpt(port: int, address: bytes | str) -> tuple[int, str]:
    with Wire(port) as wire:
        wire.greet()
        assert wire.cmd("MAIL FROM:<sender@outside.test>")[0] == 250
        line = address if isinstance(address, bytes) else address.encode()
        return wire.cmd(b"RCPT TO:<" + line + b">")


@pytest.mark.parametrize("address, why", REFUSED, ids=[w for _, w in REFUSED])
def test_an_outsider_cannot_relay(outsider, address, why):
    code, text = rcpt(outsider.port, address)
    assert (code, text) == (550, "5.7.1 Relaying denied"), why


@pytest.mark.parametrize("address, why", ACCEPTED, ids=[w for _, w in ACCEPTED])
def test_an_outsider_may_send_to_the_local_domains(outsider, address, why):
    code, text = rcpt(outsider.port, address)
    assert code == 250, (why, text)


@pytest.mark.parametrize("address, why", CONTROL, ids=[w for _, w in CONTROL])
def test_control_characters_in_an_address_are_refused(outsider, address, why):
    code, text = rcpt(outsider.port, address)
    assert code == 501 and text.startswith("5."), (why, text)


def test_a_refused_recipient_is_not_spooled_and_the_log_says_why(outsider):
    with Wire(outsider.port) as wire:
        wire.greet()
        wire.cmd("MAIL FROM:<sender@outside.test>")
        assert wire.cmd("RCPT TO:<user%other.test@local.test>")[0] == 550
        assert wire.cmd("RCPT TO:<friend@other.test>")[0] == 550
        assert wire.cmd("DATA") == (554, "5.5.1 No valid recipients")
        assert wire.cmd("RCPT TO:<user@local.test>")[0] == 250
        assert wire.cmd("DATA")[0] == 354
        wire.send(b"Subject: in\r\n\r\nhello\r\n.\r\n")
        code, text = wire.reply()
        assert code == 250, text
    spool = Spool(outsider.spool)
    [message_id] = [i for i in spool.ids() if spool.read_envelope(i).recipients[0].address == "user@local.test"]
    assert [r.address for r in spool.read_envelope(message_id).recipients] == ["user@local.test"]
    assert "rcpt=<user%other.test@local.test> relaying denied: percent hack" in outsider.log
    assert "relaying denied: not a local domain" in outsider.log


# ---------------------------------------------------------------- who may relay
def test_a_client_in_the_relay_networks_may_relay(relay_process, tmp_path):
    conf = tmp_path / "relay.conf"
    conf.write_text('[plugins]\nenable = ["relay-control"]\n[relay]\nnetworks = ["10.0.0.0/8", "127.0.0.0/8"]\n')
    relay = relay_process("--remote-clients", "--interface", "127.0.0.1", "-c", str(conf))
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        client.sendmail("me@relay.test", ["friend@other.test", "user%x@y.test"], b"Subject: out\r\n\r\nhi\r\n")
    [message_id] = Spool(relay.spool).ids()
    assert [r.address for r in Spool(relay.spool).read_envelope(message_id).recipients] == [
        "friend@other.test", "user%x@y.test"]


class Authenticated:
    """Stands in for SMTP AUTH (not implemented yet): every session is logged in as alice."""

    @hookimpl
    def on_helo(self, session, hostname):
        session.auth_user = "alice"


def test_an_authenticated_client_may_relay(inprocess_relay):
    relay = inprocess_relay(enable=["relay-control"], plugins={"fake-auth": Authenticated()},
                            config={"relay": {"networks": [], "local_domains": ["local.test"]}})
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        client.sendmail("alice@local.test", ["friend@other.test"], b"Subject: out\r\n\r\nhi\r\n")
    assert len(relay.spool.ids()) == 1


def test_the_same_client_unauthenticated_may_not(inprocess_relay):
    relay = inprocess_relay(enable=["relay-control"], config={"relay": {"networks": []}})
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        client.ehlo()
        client.mail("alice@local.test")
        assert client.rcpt("friend@other.test") == (550, b"5.7.1 Relaying denied")
        assert client.rcpt("me@relay.test")[0] == 250  # the default local domain is --domain


# ---------------------------------------------------------------- on by default for remote clients
def test_remote_clients_turn_relay_control_on(relay_process):
    relay = relay_process("--remote-clients", "--interface", "127.0.0.1")
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        client.ehlo()
        client.mail("someone@outside.test")
        # Loopback may relay: it is in the default relay networks, not a special case.
        assert client.rcpt("friend@other.test")[0] == 250
    assert "relay control: local domains relay.test; relay networks 127.0.0.0/8,::1/128" in relay.log


def test_remote_clients_in_relay_conf_turn_relay_control_on(relay_process, tmp_path):
    conf = tmp_path / "relay.conf"
    conf.write_text("[smtp]\nremote_clients = true\ninterface = [\"127.0.0.1\"]\n[relay]\nnetworks = []\n")
    relay = relay_process("-c", str(conf))
    assert rcpt(relay.port, "friend@other.test") == (550, "5.7.1 Relaying denied")
    assert rcpt(relay.port, "me@relay.test")[0] == 250


def test_a_loopback_only_relay_has_no_relay_control(relay_process):
    relay = relay_process()
    assert rcpt(relay.port, "friend@other.test")[0] == 250
    assert "relay control" not in relay.log


# ---------------------------------------------------------------- configuration errors
@pytest.mark.parametrize("section, problem", [
    ('networks = ["10.0.0.0/33"]', "[relay] networks"),
    ('local_domains = ["[10.0.0.1"]', "[relay] local_domains"),
    ('nets = []', "[relay] nets: unknown key"),
])
def test_a_bad_relay_section_stops_start_up(relay_process, tmp_path, section, problem):
    conf = tmp_path / "relay.conf"
    conf.write_text(f'[plugins]\nenable = ["relay-control"]\n[relay]\n{section}\n')
    relay = relay_process("-c", str(conf), wait=False)
    assert relay.proc.wait(30) == 1
    assert problem in relay.log


def test_the_verifier_must_come_before_relay_control(relay_process, tmp_path):
    conf = tmp_path / "relay.conf"
    conf.write_text('[plugins]\nenable = ["relay-control", "verifier"]\n[verifier]\nprogram = "exit:0"\n')
    relay = relay_process("-c", str(conf), wait=False)
    assert relay.proc.wait(30) == 1
    assert "'verifier' must come before 'relay-control'" in relay.log


# ---------------------------------------------------------------- the policy itself
POLICY = RelayPolicy.build(RelaySettings(local_domains=["Local.Test.", "[192.0.2.1]", "bücher.test"],
                                         networks=["10.1.0.0/16", "2001:db8::/32"]), "relay.test")


@pytest.mark.parametrize("peer, address, refusal", [
    ("192.0.2.9", "u@local.test", ""),
    ("192.0.2.9", "u@[192.0.2.1]", ""),                   # a listed address literal is local
    ("192.0.2.9", "u@[192.0.2.2]", "not a local domain"),
    ("192.0.2.9", "u@xn--bcher-kva.test", ""),            # configured as a U-label
    ("192.0.2.9", "u@relay.test", "not a local domain"),  # --domain only when nothing is listed
    ("192.0.2.9", "u\x00x@local.test", "control character in the address"),
    ("192.0.2.9", "u@local.test\r\nRSET", "control character in the address"),
    ("192.0.2.9", "@local.test:u@local.test", "source route"),
    ("192.0.2.9", '"a\\"b@x"@local.test', "quoted local part with a routing character"),
    ("192.0.2.9", '"john doe"@local.test', ""),
    ("192.0.2.9", "u:x@local.test", "routing character in the local part"),
    ("10.1.2.3", "u%x@other.test", ""),                   # a relay network may relay anything
    ("::ffff:10.1.2.3", "u@other.test", ""),              # IPv4-mapped IPv6
    ("2001:db8::5", "u@other.test", ""),
    ("10.2.0.1", "u@other.test", "not a local domain"),
    ("127.0.0.1", "u@other.test", "not a local domain"),  # loopback is not special
    ("", "u@other.test", "not a local domain"),           # nor is a Unix socket
    ("garbage", "u@other.test", "not a local domain"),
])
def test_the_relay_policy(peer, address, refusal):
    assert POLICY.refusal(Session(peer_ip=peer, peer_port=1), Recipient(address)) == refusal


def test_a_recipient_the_verifier_made_local_is_never_refused():
    assert POLICY.refusal(Session(peer_ip="192.0.2.9", peer_port=1),
                          Recipient.local("u%x@other.test", "u")) == ""


def test_hidden_destinations_are_named():
    assert hidden_destination("a!b@c.test") == "bang path"
    assert hidden_destination("a%b@c.test") == "percent hack"
    assert hidden_destination("plain@c.test") == ""
