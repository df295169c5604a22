"""``filter-net``: ``net:host:port`` and ``net:/path/to/socket``, a filter that is a network server.

E-MailRelay's line protocol: the relay sends the full path of the message's content file and a
newline; the server answers one line. A line starting with ``ok`` accepts the message (so does an
empty line, as in E-MailRelay); anything else is ``[NNN ]response[<TAB>logged reason]``: a leading
5xx code rejects with that code, a 4xx code is a temporary failure, no code rejects with
``[filters] reject_code`` (550 unless configured; E-MailRelay says 452). The part after a tab is
logged, never shown to the client.

Connections are kept open and reused, as E-MailRelay does; a filter keeps up to ``[net]
connections`` of them so that concurrent sessions do not queue behind one slow answer. A
connection the server dropped while idle is replaced once, transparently. A server that cannot be
reached, drops the request or does not answer within ``--filter-timeout`` is a temporary failure
(451), never a rejection: the client keeps the message and tries again.

    [net]
    connections = 4     # open connections per net: filter (requests beyond that wait their turn)
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from typing import Any, Callable

from mailrelay_sdk import FilterResult, Message, hookimpl

from mailrelay.filtering import FilterSpec, FilterSpecError

log = logging.getLogger("mailrelay.filters")

TEMPFAIL = "Temporary local problem, please try again later"
MAX_LINE = 16384  # a longer reply line is a broken server, not a verdict
_UNPRINTABLE = re.compile(r"[^\x20-\x7e\u00a0-\uffff]")


@dataclass
class NetSettings:
    connections: int = 4  # connections kept per net: filter; more concurrent requests wait


@dataclass(frozen=True)
class Address:
    """Where a filter server listens: ``host`` and ``port``, or a unix socket ``path``."""

    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.path:
            return self.path
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    async def connect(self, limit: int = MAX_LINE) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.path:
            return await asyncio.open_unix_connection(self.path, limit=limit)
        return await asyncio.open_connection(self.host, self.port, limit=limit)


def parse_address(text: str, spec_text: str, default_port: int | None = None) -> Address:
    """``host:port``, ``[ipv6]:port`` or an absolute unix socket path; a bad one stops start-up."""
    text = text.strip()
    if text.startswith("/"):
        return Address(path=text)
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise FilterSpecError(f"{spec_text!r}: bad address {text!r}")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            host, port_text = text, ""
        elif ":" in host:
            raise FilterSpecError(f"{spec_text!r}: write an IPv6 address in brackets, as [::1]:783")
    if not port_text and default_port is not None:
        port_text = str(default_port)
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise FilterSpecError(f"{spec_text!r}: expected host:port or /path/to/socket, got {text!r}")
    return Address(host=host, port=int(port_text))


def printable(text: str) -> str:
    """A server's text made safe for one SMTP reply line."""
    return _UNPRINTABLE.sub("?", text).strip()


def result_from_reply(line: str, reject_code: int = 550) -> FilterResult:
    """Map one reply line of the line protocol to a :class:`FilterResult`."""
    if not line or line.startswith("ok"):
        return FilterResult.ok()
    shown, _, logged = line.partition("\t")
    shown = printable(shown)
    code = 0
    if (len(shown) >= 3 and shown[0] in "45" and shown[1:3].isdigit()
            and (len(shown) == 3 or shown[3] == " ")):
        code, shown = int(shown[:3]), shown[4:].strip()
    code = code or reject_code
    shown = shown or "rejected"
    reason = printable(logged) or shown
    if code < 500:
        return FilterResult.fail(shown, code, f"{code // 100}.7.1", reason=reason)
    return FilterResult.reject(shown, code, f"{code // 100}.7.1", reason=reason)


class _Dropped(Exception):
    """The server closed or reset a connection before it answered."""


class NetFilter:
    """``net:ADDRESS``: one line out (the content path), one line back (the verdict)."""

    def __init__(self, spec: FilterSpec, *, reject_code: int = 550, connections: int = 4):
        if connections < 1:
            raise FilterSpecError("[net] connections must be at least 1")
        self.address = parse_address(spec.argument, spec.text)
        self.name = f"net:{self.address}"
        self.timeout = spec.timeout
        self.reject_code = reject_code
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._slots = asyncio.Semaphore(connections)

    async def __call__(self, message: Message, stage: Any) -> FilterResult:
        if message.content_path is None:
            return FilterResult.fail(TEMPFAIL, 451, "4.3.0", reason="message has no content file")
        request = str(message.content_path).encode() + b"\n"
        try:
            async with asyncio.timeout(self.timeout):
                async with self._slots:
                    line = await self._exchange(request)
        except TimeoutError:
            return self._unavailable(message, f"no answer within {self.timeout:g}s")
        except _Dropped as e:
            return self._unavailable(message, f"connection lost before the answer ({e})")
        except OSError as e:
            return self._unavailable(message, e.strerror or str(e) or type(e).__name__)
        except ValueError:  # StreamReader: a line longer than MAX_LINE
            return self._unavailable(message, f"reply line longer than {MAX_LINE} bytes")
        result = result_from_reply(line, self.reject_code)
        log.debug("id=%s filter=%s reply=%r", message.id, self.name, line)
        return result

    async def _exchange(self, request: bytes) -> str:
        """Send one request and read its answer, over a kept or a new connection."""
        kept = self._take_idle()
        if kept is None:
            return await self._ask(*await self.address.connect(), request)
        try:
            return await self._ask(*kept, request)
        except (_Dropped, OSError):
            # The server went away between two messages (restart, idle limit), so the other kept
            # connections are as stale as this one. One fresh try; its failure is the answer.
            log.info("filter=%s kept connection was closed by the server; reconnecting", self.name)
            for _, other in self._idle:
                _close(other)
            self._idle.clear()
            return await self._ask(*await self.address.connect(), request)

    def _take_idle(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        while self._idle:
            reader, writer = self._idle.pop()
            if not reader.at_eof() and not writer.is_closing():
                return reader, writer
            _close(writer)  # seen closing while idle: nothing was sent, nothing to retry
        return None

    async def _ask(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> str:
        done = False
        try:
            writer.write(request)
            await writer.drain()
            raw = await reader.readline()
            if not raw.endswith(b"\n"):
                raise _Dropped("end of stream" if not raw else "incomplete line")
            done = True
        finally:
            if done:
                self._idle.append((reader, writer))
            else:  # a late answer must never be read as the verdict on the next message
                _close(writer)
        return raw.decode("utf-8", "replace").rstrip("\r\n")

    def _unavailable(self, message: Message, why: str) -> FilterResult:
        log.error("id=%s filter=%s server unavailable: %s", message.id, self.name, why)
        return FilterResult.fail(TEMPFAIL, 451, "4.3.0", reason=f"filter server {self.address}: {why}")

    async def aclose(self) -> None:
        """Close the kept connections (relay shutdown)."""
        idle, self._idle = self._idle, []
        for _, writer in idle:
            _close(writer)
        for _, writer in idle:
            try:
                await writer.wait_closed()
            except OSError:
                pass


def _close(writer: asyncio.StreamWriter) -> None:
    try:
        writer.close()
    except (OSError, RuntimeError):  # already closed, or its loop is gone
        pass


def _reject_code(spec: FilterSpec) -> int:
    return spec.relay.plugin_settings("filters").reject_code if spec.relay is not None else 550


@hookimpl
def relay_config_schema() -> dict[str, type]:
    return {"net": NetSettings}


@hookimpl
def relay_filter_factory(register: Callable[[str, Callable[[FilterSpec], Any]], None]) -> None:
    def make(spec: FilterSpec) -> NetFilter:
        connections = spec.relay.plugin_settings("net").connections if spec.relay is not None else 4
        return NetFilter(spec, reject_code=_reject_code(spec), connections=connections)

    register("net", make)
