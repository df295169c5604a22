"""Per-destination limits: how many deliveries at once, and how many per minute.

    [limits]
    "example.com" = {connections = 2, per_minute = 60}
    "*.example.net" = {connections = 4}
    "*" = {connections = 20}

Keys match recipient domains like the routing table (exact, ``*.suffix``, ``*``). Each key has
its own budget, shared by all its domains: ``*.example.net`` allows 4 deliveries in flight across
every subdomain. The relay-wide cap is ``[queue] concurrency``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Mapping


class LimitError(ValueError):
    """A bad [limits] entry (reported at start-up)."""


@dataclass
class Budget:
    slots: asyncio.Semaphore | None
    per_minute: float
    tokens: float
    updated: float

    async def take(self) -> None:
        """Wait for a token of the per-minute rate (a bucket that refills continuously)."""
        if not self.per_minute:
            return
        while True:
            now = time.monotonic()
            self.tokens = min(self.per_minute, self.tokens + (now - self.updated) * self.per_minute / 60)
            self.updated = now
            if self.tokens >= 1:
                self.tokens -= 1
                return
            await asyncio.sleep((1 - self.tokens) * 60 / self.per_minute)


class Limits:
    def __init__(self, table: Mapping[str, Any]):
        self.exact: dict[str, Budget] = {}
        self.wildcards: list[tuple[str, Budget]] = []
        self.default: Budget | None = None
        for key, value in table.items():
            budget = _budget(key, value)
            key = key.strip().lower().rstrip(".")
            if key == "*":
                self.default = budget
            elif key.startswith("*."):
                self.wildcards.append((key[1:], budget))
            else:
                self.exact[key] = budget
        self.wildcards.sort(key=lambda kv: -len(kv[0]))

    def budget_for(self, domain: str) -> Budget | None:
        domain = domain.lower().rstrip(".")
        return self.exact.get(domain) or next(
            (b for suffix, b in self.wildcards if domain.endswith(suffix)), self.default)

    @contextlib.asynccontextmanager
    async def slot(self, domain: str) -> AsyncIterator[None]:
        budget = self.budget_for(domain)
        if budget is None:
            yield
            return
        if budget.slots is None:
            await budget.take()
            yield
            return
        async with budget.slots:
            await budget.take()
            yield


def _budget(key: str, value: Any) -> Budget:
    if not isinstance(value, Mapping) or not set(value) <= {"connections", "per_minute"}:
        raise LimitError(f"[limits] {key!r}: expected {{connections = N, per_minute = N}}")
    connections = value.get("connections", 0)
    per_minute = value.get("per_minute", 0)
    for name, number in (("connections", connections), ("per_minute", per_minute)):
        if isinstance(number, bool) or not isinstance(number, (int, float)) or number < 0:
            raise LimitError(f"[limits] {key!r}: {name} must be a positive number")
    return Budget(asyncio.Semaphore(int(connections)) if connections else None, float(per_minute),
                  float(per_minute), time.monotonic())
