"""Retry schedule and delivery state: when a deferred message is tried again, and what is kept."""

from __future__ import annotations

import random
import re

import pytest
from hypothesis import given, strategies as st

from mailrelay.queue.schedule import RetryPolicy, parse_duration, parse_schedule
from mailrelay.queue.state import Attempt, DeliveryState, load_state, save_state


def test_schedule_items_expand_with_repeats():
    assert parse_schedule(["1m", "5m*2", "30m*4", "2h*10"]) == (60.0,) + (300.0,) * 2 + (1800.0,) * 4 + (7200.0,) * 10
    assert parse_schedule(["90", "1.5h", "1d"]) == (90.0, 5400.0, 86400.0)


@pytest.mark.parametrize("bad", ["", "5x", "0m", "5m*0", "m", "5m*"])
def test_bad_schedule_items_are_named(bad):
    with pytest.raises(ValueError, match=re.escape(repr(bad)) if bad else "empty"):
        parse_schedule([bad] if bad else [])


def test_back_off_follows_the_schedule_then_repeats_the_last_interval():
    policy = RetryPolicy(parse_schedule(["1m", "5m*2", "1h"]), jitter=0.0)
    assert [policy.delay_after(n) for n in range(1, 7)] == [60, 300, 300, 3600, 3600, 3600]


@given(st.integers(min_value=1, max_value=50), st.integers(min_value=0, max_value=2**32))
def test_jitter_stays_within_ten_percent(failures, seed):
    policy = RetryPolicy(parse_schedule(["1m", "10m*3", "2h"]))
    base = RetryPolicy(policy.intervals, jitter=0.0).delay_after(failures)
    delay = policy.delay_after(failures, random.Random(seed))
    assert 0.9 * base <= delay <= 1.1 * base


def test_jitter_spreads_retries():
    policy = RetryPolicy(parse_schedule(["10m"]))
    rng = random.Random(7)
    assert len({round(policy.delay_after(1, rng)) for _ in range(20)}) > 10


def test_message_expires_at_max_age_and_the_last_try_is_at_expiry():
    policy = RetryPolicy(parse_schedule(["2h"]), max_age=parse_duration("5d"), jitter=0.0)
    received = 1_000_000.0
    assert policy.next_attempt(received, 1, received + 60) == received + 60 + 7200
    almost = received + 5 * 86400 - 600
    assert policy.next_attempt(received, 30, almost) == received + 5 * 86400  # not later than expiry
    assert policy.next_attempt(received, 31, received + 5 * 86400) is None      # expired: bounce


def test_state_round_trips_through_its_sidecar(tmp_path):
    content = tmp_path / "m.content"
    content.write_bytes(b"x")
    fresh = load_state(tmp_path, "m", content)
    assert fresh.received == pytest.approx(content.stat().st_mtime) and fresh.failures == 0
    fresh.attempts.append(Attempt(10.0, "temp", ("a@x.test",), "421 4.3.2 try later", "smart:25"))
    fresh.attempts.append(Attempt(20.0, "perm", ("b@x.test",), "550 5.1.1 no such user", "smart:25"))
    fresh.delivered.append("c@x.test")
    fresh.next_attempt = 99.5
    save_state(tmp_path, "m", fresh)
    again = load_state(tmp_path, "m", content)
    assert again == fresh
    assert again.failures == 1 and again.last_error == "550 5.1.1 no such user"


def test_corrupt_state_starts_afresh(tmp_path, caplog):
    content = tmp_path / "m.content"
    content.write_bytes(b"x")
    (tmp_path / "m.retry").write_text("{not json")
    state = load_state(tmp_path, "m", content)
    assert state.attempts == [] and "unreadable delivery state" in caplog.text
