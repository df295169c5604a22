"""When to try a deferred message again: a retry schedule with back-off, jitter and a maximum age.

A schedule is a list of intervals, each optionally repeated: ``["1m", "5m*2", "30m*4", "2h*10"]``
means wait 1 minute after the first failure, then 5 minutes twice, 30 minutes four times, then
2 hours ten times; after the list the last interval repeats. A message that has been in the
queue longer than ``max_age`` (counted from when it was received, as Postfix's
``maximal_queue_lifetime``) expires and is bounced.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_ITEM = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*(?:\*\s*(\d+))?\s*")

#: Roughly exponential: quick retries for a smarthost that is restarting, then hours.
DEFAULT_SCHEDULE = ("1m", "2m", "4m", "8m", "16m", "30m", "1h", "2h", "4h")
DEFAULT_MAX_AGE = 5 * 86400.0


def parse_duration(text: str) -> float:
    """``"90"`` or ``"90s"``, ``"5m"``, ``"2h"``, ``"5d"`` to seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", str(text))
    if not m:
        raise ValueError(f"{text!r} is not a duration (examples: 90s, 5m, 2h, 5d)")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def parse_schedule(items: list[str] | tuple[str, ...]) -> tuple[float, ...]:
    """Expand ``["1m", "5m*2"]`` to ``(60.0, 300.0, 300.0)``; errors name the bad item."""
    out: list[float] = []
    for item in items:
        m = _ITEM.fullmatch(str(item))
        if not m or float(m.group(1)) <= 0:
            raise ValueError(f"retry schedule item {item!r}: expected INTERVAL or INTERVAL*COUNT "
                             "(e.g. 5m or 30m*4)")
        count = int(m.group(3) or 1)
        if not 1 <= count <= 10000:
            raise ValueError(f"retry schedule item {item!r}: repeat count must be 1..10000")
        out += [float(m.group(1)) * _UNITS[m.group(2) or "s"]] * count
    if not out:
        raise ValueError("retry schedule is empty")
    return tuple(out)


@dataclass(frozen=True)
class RetryPolicy:
    """The schedule, the jitter (a fraction of each interval, both ways) and the maximum age."""

    intervals: tuple[float, ...] = field(default_factory=lambda: parse_schedule(DEFAULT_SCHEDULE))
    max_age: float = DEFAULT_MAX_AGE
    jitter: float = 0.1

    def delay_after(self, failures: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after the ``failures``-th failed attempt (1 for the first)."""
        base = self.intervals[min(max(failures, 1), len(self.intervals)) - 1]
        spread = base * self.jitter
        return max(1.0, base + (rng or random).uniform(-spread, spread))

    def next_attempt(self, received: float, failures: int, now: float,
                     rng: random.Random | None = None) -> float | None:
        """When to try next, or ``None`` when the message has reached ``max_age`` and expires.

        The last try is never scheduled past the expiry: a message due after it is tried once
        more at the expiry time, so it gets every chance the operator allowed.
        """
        expires = received + self.max_age
        if now >= expires:
            return None
        return min(now + self.delay_after(failures, rng), expires)
