"""Throttling of failed AUTH attempts, per client address and per user name.

Every attempt counts as a failure from the moment it starts until it succeeds, so a client that
opens many connections and tries passwords in parallel is throttled as if it had tried them one
after another. For each key (the client's address, and the user name) the failures of the last
``window`` seconds are counted, and the larger of the two counts decides:

* fewer than ``delay_after``: the attempt goes ahead at once;
* from ``delay_after`` on: it waits ``delay * 2**(failures - delay_after)`` seconds first (at
  most ``max_delay``);
* from ``disconnect_after`` on: it is refused without looking at the password (421, and the
  connection is closed). Refused attempts do not count, so the lock ends ``window`` seconds after
  the failures that caused it.

A success forgets the failures of that client address and that user. IPv6 clients are counted
per /64 network, the block one subscriber usually gets. The state is bounded: at most
``max_tracked`` keys are kept, least recently used first out, and expired keys are dropped.

:func:`throttled_login` is the whole sequence of one attempt, shared by SMTP AUTH and POP3.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import ipaddress
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from .backend import Outcome
from .trust import parse_client_address

USERNAME_KEY_LIMIT = 256


@dataclass(frozen=True)
class ThrottlePolicy:
    window: float = 900.0          # seconds a failure is remembered
    delay_after: int = 3           # failures before attempts are delayed
    delay: float = 1.0             # the first delay; doubles with each further failure
    max_delay: float = 8.0         # longest delay (keep it well below [plugins] hook_timeout)
    disconnect_after: int = 10     # failures before attempts are refused with 421
    max_tracked: int = 10000       # client addresses and user names remembered


@dataclass(frozen=True)
class Decision:
    """What to do with one attempt: refuse it, or go ahead after ``delay`` seconds."""

    refuse: bool
    delay: float
    failures: int          # failures already counted for the busier of the two keys
    token: float = 0.0     # identifies this attempt's provisional failure


def client_key(peer_ip: str) -> str:
    """The key a client address is counted under: the address, or its /64 for IPv6."""
    address = parse_client_address(peer_ip)
    if address is None:
        return f"ip:{peer_ip or 'local'}"
    if address.version == 6:
        return f"ip:{ipaddress.ip_network(f'{address}/64', strict=False)}"
    return f"ip:{address}"


class Throttle:
    """The failure counts of one relay (shared by all sessions; event-loop only, no locking)."""

    def __init__(self, policy: ThrottlePolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        self._failures: collections.OrderedDict[str, collections.deque[float]] = collections.OrderedDict()

    def _keys(self, peer_ip: str, username: str) -> tuple[str, str]:
        # Names are cut short: a client must not make us keep kilobytes per key.
        return client_key(peer_ip), f"user:{username[:USERNAME_KEY_LIMIT]}"

    def _recent(self, key: str, now: float) -> collections.deque[float]:
        times = self._failures.get(key)
        if times is None:
            return collections.deque(maxlen=self.policy.disconnect_after)
        while times and times[0] <= now - self.policy.window:
            times.popleft()
        return times

    def attempt(self, peer_ip: str, username: str) -> Decision:
        """Decide on an attempt and, unless it is refused, count it as a failure until
        :meth:`succeeded` or :meth:`withdrawn` says otherwise."""
        now = self._clock()
        self._expire(now)
        keys = self._keys(peer_ip, username)
        failures = max(len(self._recent(key, now)) for key in keys)
        policy = self.policy
        if failures >= policy.disconnect_after:
            return Decision(True, 0.0, failures)
        delay = 0.0
        if failures >= policy.delay_after:
            delay = min(policy.delay * 2 ** min(failures - policy.delay_after, 30), policy.max_delay)
        for key in keys:
            times = self._recent(key, now)
            times.append(now)
            self._failures[key] = times
            self._failures.move_to_end(key)
        while len(self._failures) > policy.max_tracked:
            self._failures.popitem(last=False)
        return Decision(False, delay, failures, now)

    def succeeded(self, peer_ip: str, username: str) -> None:
        """The attempt succeeded: forget the failures of this client and this user."""
        for key in self._keys(peer_ip, username):
            self._failures.pop(key, None)

    def withdrawn(self, peer_ip: str, username: str, decision: Decision) -> None:
        """The attempt could not be decided (a temporary error): do not count it."""
        for key in self._keys(peer_ip, username):
            times = self._failures.get(key)
            if times is not None and decision.token in times:
                times.remove(decision.token)

    def failures(self, peer_ip: str, username: str) -> int:
        """Failures counted now for the busier of the two keys (for logs and tests)."""
        now = self._clock()
        return max(len(self._recent(key, now)) for key in self._keys(peer_ip, username))

    def _expire(self, now: float) -> None:
        # Keys are in order of last use, so the expired ones are at the front.
        while self._failures:
            key, times = next(iter(self._failures.items()))
            if times and times[-1] > now - self.policy.window:
                break
            del self._failures[key]

    def __len__(self) -> int:
        return len(self._failures)


class Login(enum.Enum):
    OK = "ok"
    FAILED = "failed"          # wrong credentials, unknown user or malformed input
    TEMPORARY = "temporary"    # the check could not decide (PAM down, a bug): not counted
    LOCKED = "locked"          # too many failures: refused without a check


@dataclass(frozen=True)
class LoginOutcome:
    login: Login
    reason: str = ""


async def throttled_login(throttle: Throttle, peer_ip: str, username: str,
                          check: Callable[[], Awaitable[Outcome]], *, failure_delay: float,
                          on_failure: Callable[[str, int], None], logger: logging.Logger,
                          context: str) -> LoginOutcome:
    """One login attempt: the throttle's decision and delay, ``check`` (which runs the backend in
    a worker thread), then success, withdrawal or failure.

    ``on_failure(reason, failures)`` is called for a refused or failed attempt before the
    padding, so the log line is not delayed. Every failure takes at least ``failure_delay``
    seconds from the start of the check, whatever failed: no timing tells an unknown user from a
    wrong password. A check that raises is a temporary failure (logged with ``context``); a
    cancelled attempt stays counted as a failure.
    """
    decision = throttle.attempt(peer_ip, username)
    if decision.refuse:
        on_failure("too many failures: refused and disconnected", decision.failures)
        return LoginOutcome(Login.LOCKED)
    loop = asyncio.get_running_loop()
    if decision.delay:
        await asyncio.sleep(decision.delay)
    started = loop.time()
    try:
        outcome = await check()
    except Exception as e:  # a bug or a broken library: the client may try again
        logger.exception("%s check failed", context)
        outcome = Outcome(False, f"{type(e).__name__}: {e}", temporary=True)
    if outcome.ok:
        throttle.succeeded(peer_ip, username)
        return LoginOutcome(Login.OK)
    if outcome.temporary:
        throttle.withdrawn(peer_ip, username, decision)
        return LoginOutcome(Login.TEMPORARY, outcome.reason)
    on_failure(outcome.reason, decision.failures + 1)
    remaining = failure_delay - (loop.time() - started)
    if remaining > 0:
        await asyncio.sleep(remaining)
    return LoginOutcome(Login.FAILED, outcome.reason)
