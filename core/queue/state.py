"""Per-message delivery bookkeeping in a sidecar file, ``<id>.retry``, that E-MailRelay ignores.

It records when the message was received, every attempt with its outcome and error, which
recipients are already delivered, and when to try next. Losing it costs at most an early retry,
so it is replaced atomically (write, rename) but not flushed.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

log = logging.getLogger("mailrelay.queue")

SUFFIX = ".retry"


@dataclass(frozen=True)
class Attempt:
    """One delivery attempt for some recipients of a message."""

    time: float
    outcome: Literal["ok", "temp", "perm"]
    recipients: tuple[str, ...]
    error: str = ""          # the reply or the reason, for `relay queue show` and bounces
    destination: str = ""    # host:port or the route tried


@dataclass
class DeliveryState:
    received: float
    attempts: list[Attempt] = field(default_factory=list)
    delivered: list[str] = field(default_factory=list)
    next_attempt: float = 0.0
    warned_delay: bool = False
    persisted: bool = field(default=False, compare=False, repr=False)  # a sidecar exists on disk

    @property
    def failures(self) -> int:
        """How many attempts failed temporarily (drives the back-off)."""
        return sum(1 for a in self.attempts if a.outcome == "temp")

    @property
    def last_error(self) -> str:
        for attempt in reversed(self.attempts):
            if attempt.outcome != "ok":
                return attempt.error
        return ""

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("persisted")
        return json.dumps(data, ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "DeliveryState":
        data = json.loads(text)
        attempts = [Attempt(time=float(a["time"]), outcome=a["outcome"], recipients=tuple(a["recipients"]),
                            error=str(a.get("error", "")), destination=str(a.get("destination", "")))
                    for a in data.get("attempts", [])]
        return cls(received=float(data["received"]), attempts=attempts,
                   delivered=[str(r) for r in data.get("delivered", [])],
                   next_attempt=float(data.get("next_attempt", 0.0)),
                   warned_delay=bool(data.get("warned_delay", False)))


def state_path(directory: Path, message_id: str) -> Path:
    return directory / f"{message_id}{SUFFIX}"


def fresh_state(content_path: Path) -> DeliveryState:
    """The state of a message never tried before (received = its content file's time)."""
    try:
        return DeliveryState(received=content_path.stat().st_mtime)
    except OSError:
        return DeliveryState(received=0.0)


def load_state(directory: Path, message_id: str, content_path: Path) -> DeliveryState:
    """The message's state; a fresh one (received = the content file's time) when there is none
    or it is unreadable (which is logged: the message is still delivered)."""
    path = state_path(directory, message_id)
    try:
        state = DeliveryState.from_json(path.read_text(encoding="utf-8"))
        state.persisted = True
        return state
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("id=%s unreadable delivery state %s (%s); starting afresh", message_id, path, e)
    try:
        received = content_path.stat().st_mtime
    except OSError:
        received = 0.0
    return DeliveryState(received=received)


def save_state(directory: Path, message_id: str, state: DeliveryState) -> None:
    path = state_path(directory, message_id)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(state.to_json(), encoding="utf-8")
    os.replace(tmp, path)
    state.persisted = True


def remove_state(directory: Path, message_id: str) -> None:
    try:
        state_path(directory, message_id).unlink()
    except FileNotFoundError:
        pass
