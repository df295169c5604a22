"""Greylisting against a real relay, started by mailrelay's pytest plugin (fixtures relay, sink)."""

import time

import pytest

from mailrelay_sdk.testing import assert_accepted, assert_delivered, assert_rejected

TRIPLET = {"sender": "alice@example.test", "recipients": ["bob@example.org"]}


@pytest.fixture
def relay_plugins():
    """The plugins the relay under test enables (installed ones, by entry-point name)."""
    return ["greylist"]


@pytest.fixture
def relay_config():
    """relay.conf for the relay under test, as a dict."""
    return {"greylist": {"delay": 1}}


def test_a_new_triplet_is_greylisted_until_the_delay_has_passed(relay):
    assert_rejected(relay.send(**TRIPLET), 451, enhanced="4.7.1", text="Greylisted", stage="rcpt")
    assert_rejected(relay.send(**TRIPLET), 451, enhanced="4.7.1")   # too early: still refused
    time.sleep(1.1)
    assert_accepted(relay.send(**TRIPLET))
    assert_accepted(relay.send(**TRIPLET))                          # remembered from now on


def test_each_triplet_waits_on_its_own(relay):
    assert_rejected(relay.send(**TRIPLET), 451)
    time.sleep(1.1)
    assert_accepted(relay.send(**TRIPLET))
    assert_rejected(relay.send(sender="alice@example.test", recipients=["carol@example.org"]), 451)
    assert_rejected(relay.send(sender="mallory@example.test", recipients=["bob@example.org"]), 451)


def test_the_state_survives_a_restart(relay_factory, tmp_path):
    config = {"greylist": {"delay": 1, "database": str(tmp_path / "greylist.db")}}
    first = relay_factory(plugins=["greylist"], config=config)
    assert_rejected(first.send(**TRIPLET), 451)
    first.stop()
    time.sleep(1.1)
    assert_accepted(relay_factory(plugins=["greylist"], config=config).send(**TRIPLET))


def test_skipped_networks_are_not_greylisted(relay_factory):
    relay = relay_factory(plugins=["greylist"], config={"greylist": {"delay": 60, "skip_networks": ["127.0.0.0/8"]}})
    assert_accepted(relay.send(**TRIPLET))


def test_mail_that_passed_is_forwarded(relay, sink):
    assert_rejected(relay.send(**TRIPLET), 451)
    time.sleep(1.1)
    assert_accepted(relay.send(**TRIPLET))
    assert_delivered(sink, to="bob@example.org", sender="alice@example.test")
