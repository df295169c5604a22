"""Tests against a real relay, started by mailrelay's pytest plugin (fixtures relay and sink)."""

import pytest

from mailrelay_sdk.testing import assert_accepted, assert_delivered, assert_rejected


@pytest.fixture
def relay_plugins():
    """The plugins the relay under test enables (installed ones, by entry-point name)."""
    return ["__plugin_name__"]


@pytest.fixture
def relay_config():
    """relay.conf for the relay under test, as a dict."""
    return {"__plugin_section__": {"refused_domains": ["refused.example"]}}


def test_a_refused_domain_gets_550(relay):
    result = relay.send(recipients=["someone@refused.example"])
    assert_rejected(result, 550, enhanced="5.7.1", stage="rcpt")


def test_other_mail_is_accepted_and_forwarded(relay, sink):
    assert_accepted(relay.send(recipients=["someone@example.test"]))
    assert_delivered(sink, to="someone@example.test")
