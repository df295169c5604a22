"""Where and how long the relay listens: --interface names and prefixes, --idle-timeout, tracing."""

from __future__ import annotations

import smtplib
import time

import pytest

from mailrelay import net
from smtpwire import Wire


def test_interface_names_and_listener_prefixes():
    assert net.addresses_for("smtp", [], any_default=False) == ["127.0.0.1"]
    assert net.addresses_for("smtp", [], any_default=True) == ["0.0.0.0", "::"]
    assert net.addresses_for("smtp", ["lo-ipv4"], any_default=False) == ["127.0.0.1"]
    assert "127.0.0.1" in net.addresses_for("smtp", ["lo"], any_default=False)
    # smtp= applies to SMTP only, pop= to POP only, bare items to every listener
    mixed = ["smtp=127.0.0.2", "pop=127.0.0.3", "127.0.0.4"]
    assert net.addresses_for("smtp", mixed, any_default=False) == ["127.0.0.2", "127.0.0.4"]
    assert net.addresses_for("pop", mixed, any_default=False) == ["127.0.0.3", "127.0.0.4"]
    with pytest.raises(ValueError, match="client"):
        net.addresses_for("smtp", ["client=127.0.0.1"], any_default=False)
    with pytest.raises(ValueError, match="nosuchif0"):
        net.addresses_for("smtp", ["nosuchif0"], any_default=False)


def test_relay_listens_on_an_interface_given_by_name(relay_process):
    relay = relay_process("--interface", "smtp=lo-ipv4")
    with smtplib.SMTP("127.0.0.1", relay.port) as client:
        assert client.noop()[0] == 250


def test_idle_client_is_told_421_and_disconnected(inprocess_relay):
    relay = inprocess_relay(config={"smtp": {"idle_timeout": 1}})
    with Wire(relay.port) as w:
        w.greet()
        started = time.monotonic()
        code, text = w.reply()
        assert (code, text.split()[0]) == (421, "4.4.2")
        assert w.closed()
        assert 0.8 < time.monotonic() - started < 10


def test_a_client_that_keeps_talking_outlives_the_idle_timeout_and_is_timed_from_its_last_command(
        inprocess_relay):
    relay = inprocess_relay(config={"smtp": {"idle_timeout": 1}})
    with Wire(relay.port) as w:
        w.greet()
        started = time.monotonic()
        while time.monotonic() - started < 3:  # three idle timeouts, never a second idle
            assert w.cmd("NOOP")[0] == 250
            time.sleep(0.5)
        last = time.monotonic()
        code, text = w.reply()
        assert (code, text.split()[0]) == (421, "4.4.2")
        assert 0.5 < time.monotonic() - last < 5


def test_trace_hooks_logs_every_hook_call(relay_process):
    relay = relay_process("--plugins", "eventlog", env={"MAILRELAY_TRACE_HOOKS": "1"})
    with smtplib.SMTP("127.0.0.1", relay.port) as client:
        client.sendmail("a@example.test", ["b@example.test"], b"Subject: traced\r\n\r\nhi\r\n")
    relay.stop()
    assert "trace hook=on_event plugin=eventlog" in relay.log
