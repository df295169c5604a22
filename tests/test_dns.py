"""The one shared DNS resolver: plugins reach the nameservers configured in [dns]."""

from __future__ import annotations

import smtplib

import dns.exception
import dns.resolver
import pytest

from mailrelay_sdk import Verdict, hookimpl


class RequireMx:
    """Refuses recipients whose domain has no MX record, using the relay's resolver."""

    def __init__(self):
        self.relay = None

    @hookimpl
    def relay_startup(self, relay):
        self.relay = relay

    @hookimpl
    async def on_rcpt_to(self, recipient):
        try:
            answer = await self.relay.resolver.resolve(recipient.domain, "MX")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return Verdict.deny("Recipient domain has no mail exchanger", code=550, enhanced="5.1.2")
        except dns.exception.DNSException:
            return Verdict.deny_soft("DNS lookup failed", code=451, enhanced="4.4.3")
        hosts = sorted((r.preference, str(r.exchange)) for r in answer)
        return None if hosts == [(10, "mx1.example.test."), (20, "mx2.example.test.")] else \
            Verdict.deny(f"unexpected MX {hosts}")


def test_plugins_resolve_through_the_configured_nameserver(inprocess_relay, dns_server):
    host, port = dns_server
    relay = inprocess_relay(plugins={"require-mx": RequireMx()},
                            config={"dns": {"nameservers": [f"{host}:{port}"], "timeout": 2}})
    with smtplib.SMTP("127.0.0.1", relay.port) as client:
        refused = client.sendmail("a@example.test", ["ok@example.test", "x@nomx.test", "y@nxdomain.test"],
                                  b"Subject: dns\r\n\r\nhi\r\n")
    assert refused == {"x@nomx.test": (550, b"5.1.2 Recipient domain has no mail exchanger"),
                       "y@nxdomain.test": (550, b"5.1.2 Recipient domain has no mail exchanger")}
    [message_id] = relay.spool.ids()
    assert [r.address for r in relay.spool.read_envelope(message_id).recipients] == ["ok@example.test"]


def test_resolver_settings_are_applied(inprocess_relay, dns_server):
    host, port = dns_server
    relay = inprocess_relay(config={"dns": {"nameservers": [f"{host}:{port}"], "timeout": 1.5, "attempts": 3}})
    resolver = relay.relay.resolver
    assert [(ns.address, ns.port) for ns in resolver.nameservers] == [(host, port)]
    assert resolver.timeout == 1.5 and resolver.lifetime == pytest.approx(4.5)
