"""MX routing's DNS side against a real dnsmasq: which hosts a domain's mail goes to, or why none."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import dns.name
import pytest

from mailrelay.config.settings import DnsSettings
from mailrelay.dns import make_resolver
from mailrelay_plugins.forward.mx import (DnsTemporaryError, MailHost, MxError, NoMailHosts, NoSuchDomain,
                                          NullMx, resolve_mail_hosts)

TIMEOUT = 0.5  # the resolver's per-lookup limit; lookups under timeout.test take this long


@pytest.fixture
def resolver(dns_server):
    host, port = dns_server
    return make_resolver(DnsSettings(nameservers=[f"{host}:{port}"], timeout=TIMEOUT, attempts=1))


def hosts_for(resolver, domain: str, **options) -> list[MailHost]:
    return asyncio.run(resolve_mail_hosts(resolver, domain, **options))


def failure_for(resolver, domain: str, **options) -> MxError:
    with pytest.raises(MxError) as caught:
        hosts = hosts_for(resolver, domain, **options)
        pytest.fail(f"{domain} resolved to {hosts}")
    return caught.value


def test_mx_hosts_are_tried_lowest_preference_first(resolver):
    expected = [MailHost(10, "mx1.example.test", ("127.0.0.1",)),
                MailHost(20, "mx2.example.test", ("127.0.0.1",))]
    assert hosts_for(resolver, "example.test") == expected
    assert hosts_for(resolver, "Example.TEST.") == expected


def test_equal_preferences_are_shuffled_on_every_call(resolver):
    orders: Counter[str] = Counter()
    for _ in range(40):
        hosts = hosts_for(resolver, "equal.test")
        assert [h.preference for h in hosts] == [10, 10, 20]
        assert hosts[2] == MailHost(20, "mxc.equal.test", ("127.0.0.13",))
        assert {(h.name, h.addresses) for h in hosts[:2]} == {("mxa.equal.test", ("127.0.0.11",)),
                                                                ("mxb.equal.test", ("127.0.0.12",))}
        orders[hosts[0].name] += 1
    # dnsmasq always answers in the same order, so both orders only come from the shuffle.
    assert set(orders) == {"mxa.equal.test", "mxb.equal.test"}


def test_a_host_listed_twice_is_tried_once_at_its_best_preference(resolver):
    assert [(h.preference, h.name) for h in hosts_for(resolver, "twice.test")] == [(10, "mx1.example.test"),
                                                                                 (20, "mx2.example.test")]


def test_addresses_alternate_between_ipv6_and_ipv4(resolver):
    [host] = hosts_for(resolver, "dual.test")
    assert (host.preference, host.name) == (10, "mx.dual.test")
    # dnsmasq rotates the records of a name between answers, so only the families' order is fixed.
    assert [":" in address for address in host.addresses] == [True, False, True, False, True]
    assert sorted(host.addresses) == ["127.0.0.21", "127.0.0.22", "::21", "::22", "::23"]


def test_a_domain_without_mx_is_its_own_mail_host(resolver):
    assert hosts_for(resolver, "nomx.test") == [MailHost(0, "nomx.test", ("127.0.0.1",))]
    assert hosts_for(resolver, "v6only.test") == [MailHost(0, "v6only.test", ("::1",))]


def test_the_implicit_mx_can_be_refused(resolver):
    error = failure_for(resolver, "nomx.test", implicit_mx=False)
    assert type(error) is NoMailHosts and error.permanent and error.status == "5.1.2"
    assert hosts_for(resolver, "example.test", implicit_mx=False)[0].name == "mx1.example.test"


def test_a_domain_with_neither_mx_nor_addresses_bounces(resolver):
    error = failure_for(resolver, "txtonly.test")
    assert type(error) is NoMailHosts and error.permanent and error.status == "5.1.2"
    assert "txtonly.test" in str(error)


def test_null_mx_bounces(resolver):
    error = failure_for(resolver, "nullmx.test")
    assert type(error) is NullMx and error.permanent and error.status == "5.1.10"
    assert "null MX" in error.message


def test_a_null_mx_among_real_ones_is_ignored(resolver):
    assert hosts_for(resolver, "mixednull.test") == [MailHost(10, "mx1.example.test", ("127.0.0.1",))]


def test_mx_hosts_without_addresses_are_skipped(resolver):
    assert hosts_for(resolver, "partial.test") == [MailHost(10, "mx2.example.test", ("127.0.0.1",))]


def test_mx_hosts_all_without_addresses_are_retried_later(resolver):
    error = failure_for(resolver, "noaddr.test")
    assert type(error) is NoMailHosts and not error.permanent and error.status == "4.4.4"
    assert "ghost.noaddr.test" in error.message and "txt.noaddr.test" in error.message


def test_a_domain_that_does_not_exist_bounces(resolver):
    error = failure_for(resolver, "nxdomain.test")
    assert type(error) is NoSuchDomain and error.permanent and error.status == "5.1.2"


def test_an_mx_lookup_that_times_out_is_retried_later(resolver):
    started = time.monotonic()
    error = failure_for(resolver, "mail.timeout.test")
    assert type(error) is DnsTemporaryError and not error.permanent and error.status == "4.4.3"
    assert TIMEOUT * 0.9 < time.monotonic() - started < TIMEOUT + 1.5


def test_an_mx_host_that_times_out_is_skipped_for_one_that_answers(resolver):
    started = time.monotonic()
    assert hosts_for(resolver, "slowmx.test") == [MailHost(10, "mx1.example.test", ("127.0.0.1",))]
    assert time.monotonic() - started < TIMEOUT + 1.5


def test_mx_hosts_that_time_out_or_have_no_address_are_retried_later(resolver):
    error = failure_for(resolver, "slowonly.test")
    assert type(error) is DnsTemporaryError and error.status == "4.4.3"  # not the 4.4.4 of no addresses
    assert "mx.timeout.test" in error.message


def test_servfail_is_retried_later(dns_servfail):
    host, port = dns_servfail
    resolver = make_resolver(DnsSettings(nameservers=[f"{host}:{port}"], timeout=5, attempts=1))
    started = time.monotonic()
    error = failure_for(resolver, "example.test")
    assert type(error) is DnsTemporaryError and not error.permanent and error.status == "4.4.3"
    assert time.monotonic() - started < 2  # an answer, not a timeout


class NoDns:
    async def resolve(self, *args, **kwargs):
        raise AssertionError(f"DNS lookup {args}")


@pytest.mark.parametrize("domain, address", [("[127.0.0.1]", "127.0.0.1"), ("[IPv6:::1]", "::1"),
                                             ("[ipv6:2001:DB8:0::1]", "2001:db8::1")])
def test_address_literals_need_no_dns(domain, address):
    assert hosts_for(NoDns(), domain) == [MailHost(0, address, (address,))]


@pytest.mark.parametrize("domain", ["[127.0.0.1", "[::1]", "[IPv6:127.0.0.1]", "[127.0.0.256]", "[localhost]",
                                    "[IPv6:fe80::1%eth0]", "", ".", "a..test", "exa mple.test", "a\\.test",
                                    "-" * 64 + ".test", "ab\u200d.test"])
def test_malformed_domains_bounce_without_dns(domain):
    error = failure_for(NoDns(), domain)
    assert type(error) is MxError and error.permanent and error.status == "5.1.3"


def test_international_domains_are_looked_up_in_idna_2008(resolver):
    expected = [MailHost(10, "mx1.example.test", ("127.0.0.1",))]
    assert hosts_for(resolver, "bücher.test") == expected
    assert hosts_for(resolver, "BÜCHER.test") == expected
    # IDNA 2003 would have looked up strasse.test, which does not exist.
    assert hosts_for(resolver, "straße.test") == [MailHost(0, "xn--strae-oqa.test", ("127.0.0.31",))]


def test_international_domains_without_the_idna_package_are_retried_later(resolver, monkeypatch):
    monkeypatch.setattr(dns.name, "have_idna_2008", False)
    error = failure_for(resolver, "bücher.test")
    assert type(error) is MxError and not error.permanent and error.status == "4.3.5"
    assert hosts_for(resolver, "example.test")[0].name == "mx1.example.test"
