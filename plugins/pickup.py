"""``pickup``: a maildrop directory for applications (Postfix's pickup, maildir-style).

    [pickup]
    dir = "/var/spool/mailrelay/pickup"   # the relay creates tmp/, new/ and bad/ in it
    interval = 0.5                        # seconds between looks at new/
    retry = 60                            # seconds before a temporarily refused file is tried again

An application writes a complete RFC 5322 message into ``dir/tmp/NAME`` and renames it into
``dir/new/NAME``: the rename makes it appear whole. The relay takes the envelope from the headers
(sender: ``Return-Path``, ``Sender`` or ``From``; recipients: ``To``, ``Cc`` and ``Bcc``) or from a
sidecar ``new/NAME.json`` ``{"from": ..., "to": [...]}`` renamed into ``new/`` before the message.
``Bcc`` and ``Return-Path`` are removed from the content. The message is queued through
:func:`mailrelay.inject.inject`: the same policies, filters and durable commit as SMTP, as a local
client (``127.0.0.1``, HELO ``pickup``). The file is removed only after the commit; a file that is
malformed or refused for good moves to ``bad/NAME`` with the reason in ``bad/NAME.reason``; one
refused for now (4xx) stays and is tried again after ``retry`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mailrelay_sdk import InjectionRefused, Relay, events, hookimpl, inject

from mailrelay.config import ConfigError
from mailrelay.submission import SubmissionError, crlf, envelope_from_headers, looks_like_a_message, strip_fields

log = logging.getLogger("mailrelay.pickup")

SIDECAR = ".json"


@dataclass
class PickupSettings:
    dir: str = ""                # the pickup directory; required
    interval: float = 0.5        # seconds between scans of new/
    retry: float = 60.0          # seconds before a temporarily refused file is tried again
    concurrency: int = 8         # files queued at once (their commits share disk flushes)


class Malformed(Exception):
    """The file cannot be queued as it is: it goes to ``bad/`` with this reason."""


@dataclass(frozen=True)
class Dropped:
    """What was read from ``new/``: the content and the envelope it names."""

    sender: str
    recipients: list[str]
    content: bytes


def parse_dropped(content: bytes, sidecar: Any | None) -> Dropped:
    """The envelope and cleaned content of a dropped file; raises :class:`Malformed`."""
    content = crlf(content)
    if not looks_like_a_message(content):
        raise Malformed("not an RFC 5322 message: the first line is not a header field")
    try:
        headers = envelope_from_headers(content)
    except SubmissionError as e:
        raise Malformed(str(e)) from None
    sender, recipients = headers.sender, headers.recipients
    has_sender = bool(sender) or _null_return_path(content)
    if sidecar is not None:
        if not isinstance(sidecar, dict) or set(sidecar) - {"from", "to"}:
            raise Malformed('sidecar: expected a JSON object with "from" and/or "to" only')
        if "from" in sidecar:
            if not isinstance(sidecar["from"], str):
                raise Malformed('sidecar: "from" must be a string ("" for the null sender)')
            sender, has_sender = sidecar["from"].strip().strip("<>"), True
        if "to" in sidecar:
            to = sidecar["to"]
            to = [to] if isinstance(to, str) else to
            if not isinstance(to, list) or not all(isinstance(a, str) for a in to):
                raise Malformed('sidecar: "to" must be a list of addresses')
            recipients = [a.strip().strip("<>") for a in to if a.strip()]
    if not has_sender:
        raise Malformed("no sender: no Return-Path, Sender or From header (or sidecar \"from\")")
    if not recipients:
        raise Malformed("no recipients: no To, Cc or Bcc header (or sidecar \"to\")")
    return Dropped(sender, recipients, strip_fields(content, {"bcc", "return-path"}))


def _null_return_path(content: bytes) -> bool:
    head = content.split(b"\r\n\r\n", 1)[0]
    return any(line.lower().replace(b" ", b"") == b"return-path:<>" for line in head.split(b"\r\n"))


class PickupWatcher:
    """The background task: scans ``new/`` and queues what it finds (a ``relay_listeners`` object)."""

    def __init__(self, relay: Relay, settings: PickupSettings):
        self.relay = relay
        self.settings = settings
        self.root = Path(settings.dir)
        self.new, self.bad = self.root / "new", self.root / "bad"
        self._retry_at: dict[str, float] = {}
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await asyncio.to_thread(self._make_directories)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="pickup")
        log.info("pickup: watching %s every %gs", self.new, self.settings.interval)

    async def stop(self) -> None:
        """Let the file being queued finish (its commit must not be cut off), then stop."""
        self._stopping.set()
        if self._task is not None:
            done, _ = await asyncio.wait([self._task], timeout=10)
            if not done:
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)

    def _make_directories(self) -> None:
        for sub in ("tmp", "new", "bad"):
            (self.root / sub).mkdir(mode=0o770, parents=True, exist_ok=True)

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.scan()
            except FileNotFoundError:  # someone removed the directories: make them again
                log.warning("pickup: %s vanished; creating it again", self.new)
                with contextlib.suppress(OSError):
                    await asyncio.to_thread(self._make_directories)
            except Exception:  # a full disk, permissions: log, keep watching
                log.exception("pickup: scanning %s failed", self.new)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.settings.interval)

    async def scan(self) -> int:
        """Queue (or set aside) every complete file in ``new/`` that is due; return how many."""
        names = await asyncio.to_thread(self._list)
        now = time.monotonic()
        self._retry_at = {n: t for n, t in self._retry_at.items() if n in names}
        due = [n for n in names if self._retry_at.get(n, 0.0) <= now]
        slots = asyncio.Semaphore(max(1, self.settings.concurrency))

        async def take(name: str) -> None:
            async with slots:
                if self._stopping.is_set():
                    return
                try:
                    await self.take(name)
                except Exception:  # e.g. bad/ not writable: keep the file, do not spin on it
                    log.exception("pickup: %s could not be handled; trying again in %gs", name, self.settings.retry)
                    self._retry_at[name] = time.monotonic() + self.settings.retry

        await asyncio.gather(*(take(n) for n in due))
        return len(due)

    def _list(self) -> list[str]:
        entries = []
        with os.scandir(self.new) as scan:
            for entry in scan:
                # Dot-files are someone's temporary files; directories are not ours to judge.
                if entry.name.startswith(".") or entry.name.endswith(SIDECAR) or entry.is_dir(follow_symlinks=False):
                    continue
                entries.append((entry.stat(follow_symlinks=False).st_mtime, entry.name))
        return [name for _, name in sorted(entries)]

    def _read(self, name: str) -> tuple[bytes, Any | None]:
        path = self.new / name
        if not path.is_file() or path.is_symlink():  # a link could point anywhere, a FIFO block
            raise Malformed("not a regular file (a symbolic link, a FIFO or a device)")
        limit = self.relay.settings.smtp.size
        if limit and path.stat().st_size > limit:
            raise Malformed(f"552 5.3.4 Message size exceeds fixed maximum message size ({limit} octets)")
        content = path.read_bytes()
        sidecar_path = self.new / (name + SIDECAR)
        if not sidecar_path.exists():
            return content, None
        try:
            return content, json.loads(sidecar_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise Malformed(f"sidecar {name}{SIDECAR} is not valid JSON: {e}") from None

    async def take(self, name: str) -> None:
        """Queue one file; remove it after the commit, set it aside, or leave it for a retry."""
        try:
            dropped = parse_dropped(*await asyncio.to_thread(self._read, name))
        except FileNotFoundError:
            return  # someone else took it (an operator, or a rename still in flight)
        except Malformed as e:
            await self._set_aside(name, str(e))
            return
        try:
            result = await inject(self.relay, dropped.sender, dropped.recipients, dropped.content,
                                  client_ip="127.0.0.1", helo="pickup")
        except InjectionRefused as e:
            detail = e.reply + "".join(f"\n{address}: {reply}" for address, reply in e.refused)
            if e.temporary:
                self._retry_at[name] = time.monotonic() + self.settings.retry
                log.warning("pickup: %s refused for now, trying again in %gs: %s", name, self.settings.retry,
                            e.reply)
                return
            await self._set_aside(name, detail)
            return
        await asyncio.to_thread(self._remove, name)
        for address, reply in result.refused:
            log.warning("pickup: %s id=%s recipient %s refused: %s", name, result.message_id, address, reply)
        log.info("pickup: %s queued as %s", name, result.message_id or "(discarded)")

    def _remove(self, name: str) -> None:
        for path in (self.new / name, self.new / (name + SIDECAR)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    async def _set_aside(self, name: str, reason: str) -> None:
        target = await asyncio.to_thread(self._move_to_bad, name, reason)
        log.warning("pickup: %s moved to %s: %s", name, target, reason.splitlines()[0])
        self.relay.emit(events.PICKUP_REFUSED, file=name, moved_to=str(target), reason=reason)

    def _move_to_bad(self, name: str, reason: str) -> Path:
        target = name
        if (self.bad / target).exists():  # a reused name: keep the earlier file too
            target = f"{name}.{time.time_ns()}"
        (self.bad / f"{target}.reason").write_text(reason + "\n", encoding="utf-8")
        os.replace(self.new / name, self.bad / target)
        with contextlib.suppress(FileNotFoundError):
            os.replace(self.new / (name + SIDECAR), self.bad / (target + SIDECAR))
        return self.bad / target


class PickupPlugin:
    """One instance per relay (the entry point names the class)."""

    @hookimpl
    def relay_config_schema(self) -> dict[str, type]:
        return {"pickup": PickupSettings}

    @hookimpl
    def relay_listeners(self, relay: Relay) -> list[PickupWatcher]:
        settings: PickupSettings = relay.plugin_settings("pickup")
        if not settings.dir or not os.path.isabs(os.path.expanduser(settings.dir)):
            # Absolute: the daemon changes directory to "/" when it detaches.
            raise ConfigError("[pickup] dir: the pickup plugin needs the absolute path of a directory to watch")
        settings.dir = os.path.expanduser(settings.dir)
        if settings.interval <= 0 or settings.retry < 0:
            raise ConfigError("[pickup] interval must be above 0 and retry 0 or more (seconds)")
        return [PickupWatcher(relay, settings)]
