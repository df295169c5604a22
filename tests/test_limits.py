"""Inbound limits: connection caps (``[smtp] max_connections``, ``max_connections_per_client``),
slow clients (``command_timeout``, ``min_data_rate``) and the ``rate-limits`` plugin."""

from __future__ import annotations

import select
import time

import pytest

from conftest import wait_until
from smtpwire import Wire

TOO_MANY = (421, "4.7.0 Too many connections, try again later")
TOO_MANY_FROM_YOU = (421, "4.7.0 Too many connections from your address, try again later")


def _greeted(port: int) -> Wire:
    wire = Wire(port)
    assert wire.reply()[0] == 220
    return wire


def _refused_with(port: int) -> tuple[int, str] | None:
    """The reply a new connection gets if it is refused (then the server closes), else None."""
    with Wire(port) as wire:
        reply = wire.reply()
        if reply[0] == 220:
            wire.cmd("QUIT")
            return None
        assert wire.closed()
        return reply


def _trickle(wire: Wire, data: bytes, interval: float) -> None:
    """Send ``data`` one octet per ``interval`` until the server says something."""
    for byte in data:
        if select.select([wire.sock], [], [], interval)[0]:
            return
        wire.send(bytes([byte]))
    raise AssertionError("the server let the whole trickle through")


# ---------------------------------------------------------------- connection caps
@pytest.mark.parametrize("key, refusal", [("max_connections", TOO_MANY),
                                          ("max_connections_per_client", TOO_MANY_FROM_YOU)])
def test_a_connection_over_the_cap_gets_421_and_a_closed_one_frees_its_slot(inprocess_relay, key, refusal):
    relay = inprocess_relay(config={"smtp": {key: 3}})
    open_ones = [_greeted(relay.port) for _ in range(3)]
    assert _refused_with(relay.port) == refusal
    assert _refused_with(relay.port) == refusal  # a refused connection does not count
    assert open_ones[0].cmd("QUIT")[0] == 221
    open_ones[0].close()
    wait_until(lambda: _refused_with(relay.port) is None, what="the freed slot")
    for wire in open_ones[1:]:
        assert wire.cmd("NOOP")[0] == 250
        wire.close()


def test_zero_means_no_connection_limit(inprocess_relay):
    relay = inprocess_relay(config={"smtp": {"max_connections": 0, "max_connections_per_client": 0}})
    wires = [_greeted(relay.port) for _ in range(60)]  # beyond the default of 50 per client
    assert wires[-1].cmd("NOOP")[0] == 250
    for wire in wires:
        wire.close()


# ---------------------------------------------------------------- slow clients
def test_a_command_trickled_byte_by_byte_is_dropped_within_the_deadline(inprocess_relay):
    relay = inprocess_relay(config={"smtp": {"command_timeout": 1}})
    with _greeted(relay.port) as wire:
        started = time.monotonic()
        _trickle(wire, b"EHLO slowloris.example.test", 0.2)
        assert wire.reply() == (421, "4.4.2 Command not completed in time, closing connection")
        assert wire.closed()
        assert time.monotonic() - started < 2.5


def test_a_slow_but_complete_client_is_served(inprocess_relay):
    relay = inprocess_relay(config={"smtp": {"command_timeout": 1, "idle_timeout": 30}})
    with _greeted(relay.port) as wire:
        for line in (b"EHLO slow.example.test\r\n", b"MAIL FROM:<a@example.test>\r\n"):
            for piece in (line[:3], line[3:8], line[8:]):  # each line whole within the deadline
                wire.send(piece)
                time.sleep(0.25)
            assert wire.reply()[0] == 250
            time.sleep(1.5)  # thinking between commands is the idle timeout's business
        assert wire.cmd("QUIT")[0] == 221


def test_back_to_back_slow_commands_each_get_their_own_deadline(inprocess_relay):
    # The second line starts before the first one's deadline and ends after it: its own
    # deadline, a second after its first octet, is the one that counts.
    relay = inprocess_relay(config={"smtp": {"command_timeout": 1, "idle_timeout": 30}})
    with _greeted(relay.port) as wire:
        started = time.monotonic()
        wire.send(b"EHLO slow.exa")
        time.sleep(0.4)
        wire.send(b"mple.test\r\n")
        assert wire.reply()[0] == 250
        time.sleep(0.2)
        line = b"MAIL FROM:<a@example.test>\r\n"
        for piece in (line[:4], line[4:12], line[12:]):
            wire.send(piece)
            time.sleep(0.35)
        assert time.monotonic() - started > 1.2  # past the first line's deadline
        assert wire.reply()[0] == 250
        assert wire.cmd("QUIT")[0] == 221


def test_message_data_trickled_too_slowly_is_dropped_and_not_spooled(inprocess_relay):
    relay = inprocess_relay(config={"smtp": {"command_timeout": 1, "min_data_rate": 500}})
    with _greeted(relay.port) as wire:
        assert wire.cmd("EHLO client.test")[0] == 250
        assert wire.cmd("MAIL FROM:<a@example.test>")[0] == 250
        assert wire.cmd("RCPT TO:<b@example.test>")[0] == 250
        assert wire.cmd("DATA")[0] == 354
        started = time.monotonic()
        _trickle(wire, b"x" * 40, 0.1)
        assert wire.reply() == (421, "4.4.2 Message data arriving too slowly, closing connection")
        assert time.monotonic() - started < 2.5
    assert relay.spool.ids() == []


# ---------------------------------------------------------------- the rate-limits plugin
def _rate_limited(inprocess_relay, **limits):
    return inprocess_relay(enable=["rate-limits"], config={"rate_limits": {"exempt": [], "window": 2, **limits}})


def test_messages_over_the_rate_get_450_until_the_window_refills(inprocess_relay):
    relay = _rate_limited(inprocess_relay, messages=2, recipients=0)
    with _greeted(relay.port) as wire:
        assert wire.cmd("EHLO client.test")[0] == 250
        for _ in range(2):
            assert wire.cmd("MAIL FROM:<a@example.test>")[0] == 250
            assert wire.cmd("RSET")[0] == 250
        assert wire.cmd("MAIL FROM:<a@example.test>") == \
            (450, "4.7.1 Too many messages from your address (limit 2 per 2 seconds), try again later")
        time.sleep(2.1)  # a quiet window: the whole allowance is back
        for _ in range(2):
            assert wire.cmd("MAIL FROM:<a@example.test>")[0] == 250
            assert wire.cmd("RSET")[0] == 250
        assert wire.cmd("MAIL FROM:<a@example.test>")[0] == 450


def test_recipients_over_the_rate_get_450_and_the_message_still_goes(inprocess_relay):
    relay = _rate_limited(inprocess_relay, messages=0, recipients=3)
    with _greeted(relay.port) as wire:
        assert wire.cmd("EHLO client.test")[0] == 250
        assert wire.cmd("MAIL FROM:<a@example.test>")[0] == 250
        for n in range(3):
            assert wire.cmd(f"RCPT TO:<b{n}@example.test>")[0] == 250
        assert wire.cmd("RCPT TO:<b3@example.test>") == \
            (450, "4.7.1 Too many recipients from your address (limit 3 per 2 seconds), try again later")
        assert wire.cmd("DATA")[0] == 354
        assert wire.cmd(b"Subject: t\r\n\r\nhi\r\n.")[0] == 250
    wait_until(lambda: len(relay.spool.ids()) == 1, what="the message")


def test_exempt_networks_are_not_limited(inprocess_relay):
    relay = inprocess_relay(enable=["rate-limits"], config={"rate_limits": {"messages": 1}})  # loopback exempt
    with _greeted(relay.port) as wire:
        assert wire.cmd("EHLO client.test")[0] == 250
        for _ in range(3):
            assert wire.cmd("MAIL FROM:<a@example.test>")[0] == 250
            assert wire.cmd("RSET")[0] == 250


def test_rate_buckets_are_bounded():
    from mailrelay_plugins.rate_limits import Buckets

    now = [0.0]
    buckets = Buckets(limit=1, window=10, max_clients=100, clock=lambda: now[0])
    for n in range(1000):
        assert buckets.take(f"192.0.2.{n}")
    assert len(buckets) == 100
    assert not buckets.take("192.0.2.999")  # recently seen: remembered
    now[0] = 10.0
    assert buckets.take("192.0.2.999")      # refilled after the window
