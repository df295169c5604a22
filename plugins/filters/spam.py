"""``filter-spam``: SpamAssassin's spamd as a filter, through aiospamc.

* ``spam:ADDRESS`` asks spamd whether the message is spam (a SYMBOLS request) and rejects it when
  it is, with ``[filters] reject_code`` (550 unless configured) and ``5.7.1 Message looks like spam
  (score S/T)``; the rules that fired go to the log only. E-MailRelay answers 452 here, which only
  makes the sender try again.
* ``spam-edit:ADDRESS`` has spamd rewrite the message (a PROCESS request: the ``X-Spam-*`` headers
  and, for spam with spamd's default ``report_safe``, the report with the original attached) and
  never rejects.

``ADDRESS`` is ``host:port`` (the port defaults to spamd's 783), ``[ipv6]:port`` or the path of
spamd's unix socket (``spam:/run/spamd.s``). Each request has ``--filter-timeout`` seconds.

    [spam]
    on_error = "tempfail"   # spamd down, too slow or confused: "tempfail" (451, the client retries)
                            # or "accept" (pass the message on with "X-Spam-Checker: unavailable")
    max_size = 512000       # bytes; larger messages pass unscanned, as with spamc (0: scan everything)
    user = ""               # the user whose preferences spamd applies (spamc -u)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import aiospamc
from aiospamc.exceptions import ClientException, ParseError, TimeoutException
from aiospamc.responses import Response, ResponseException

from mailrelay_sdk import FilterResult, Message, hookimpl

from mailrelay.filtering import FilterSpec, FilterSpecError

from .net import TEMPFAIL, Address, parse_address, printable

log = logging.getLogger("mailrelay.filters")

SPAMD_PORT = 783
UNAVAILABLE_HEADER = b"X-Spam-Checker: unavailable\r\n"
# What aiospamc raises when spamd cannot be reached, times out, or answers with an error or garbage.
_SPAMD_ERRORS = (ClientException, ResponseException, TimeoutException, ParseError, TimeoutError, OSError)


@dataclass
class SpamSettings:
    on_error: Literal["tempfail", "accept"] = "tempfail"  # spamd unavailable: 451, or accept and tag
    max_size: int = 512000                                # bytes scanned at most (spamc's default); 0: no limit
    user: str = ""                                        # spamd user preferences to apply (spamc -u)


class SpamdUnavailable(Exception):
    """spamd could not give an answer we can act on."""


class SpamFilter:
    """``spam:`` (reject spam) or ``spam-edit:`` (let spamd rewrite the message)."""

    in_memory = True  # works on message.content only: no need to write edits to the file first

    def __init__(self, spec: FilterSpec, *, edit: bool, settings: SpamSettings | None = None,
                 reject_code: int = 550):
        self.settings = settings or SpamSettings()
        if self.settings.max_size < 0:
            raise FilterSpecError("[spam] max_size must be 0 (no limit) or a number of bytes")
        self.address: Address = parse_address(spec.argument, spec.text, default_port=SPAMD_PORT)
        self.edit = edit
        self.name = f"{spec.scheme}:{self.address}"
        self.timeout = spec.timeout
        self.reject_code = reject_code

    async def __call__(self, message: Message, stage: Any) -> FilterResult:
        content = message.content
        limit = self.settings.max_size
        if limit and len(content) > limit:
            log.info("id=%s filter=%s not scanned: %d bytes is over [spam] max_size %d",
                     message.id, self.name, len(content), limit)
            return FilterResult.ok()
        try:
            response = await self._ask(content)
            spam, score, threshold = _verdict(response)
            edited = _edited_message(response) if self.edit else None
        except (SpamdUnavailable, *_SPAMD_ERRORS) as e:
            return self._unavailable(message, _describe(e))
        log.info("id=%s filter=%s spam=%s score=%s/%s", message.id, self.name, "yes" if spam else "no",
                 score, threshold)
        if edited is not None:
            return FilterResult.ok(content=edited)
        if not spam:
            return FilterResult.ok()
        text = f"Message looks like spam (score {score:.1f}/{threshold:.1f})"
        rules = printable(bytes(response.body).decode("ascii", "replace"))
        reason = f"spamd score {score}/{threshold}" + (f" tests={rules}" if rules else "")
        if self.reject_code < 500:
            return FilterResult.fail(text, self.reject_code, "4.7.1", reason=reason)
        return FilterResult.reject(text, self.reject_code, "5.7.1", reason=reason)

    async def _ask(self, content: bytes) -> Response:
        where: dict[str, Any] = (
            {"socket_path": Path(self.address.path)} if self.address.path
            else {"host": self.address.host, "port": self.address.port})
        request = aiospamc.process if self.edit else aiospamc.symbols
        return await request(content, **where, user=self.settings.user or None,
                             timeout=aiospamc.Timeout(total=self.timeout, connection=self.timeout))

    def _unavailable(self, message: Message, why: str) -> FilterResult:
        if self.settings.on_error == "accept":
            log.warning("id=%s filter=%s spamd unavailable, passing the message unscanned: %s",
                        message.id, self.name, why)
            return FilterResult.ok(content=UNAVAILABLE_HEADER + message.content)
        log.error("id=%s filter=%s spamd unavailable: %s", message.id, self.name, why)
        return FilterResult.fail(TEMPFAIL, 451, "4.3.0", reason=f"spamd {self.address}: {why}")


def _verdict(response: Response) -> tuple[bool, float, float]:
    spam = response.headers.spam if "Spam" in response.headers else None
    if spam is None:
        raise SpamdUnavailable("spamd's answer has no Spam header")
    return bool(spam.value), float(spam.score), float(spam.threshold)


def _edited_message(response: Response) -> bytes:
    body = bytes(response.body)
    if not body.strip():  # never replace a message with nothing
        raise SpamdUnavailable("spamd returned an empty message")
    # The spool is CRLF; spamd keeps the line endings it was given, but make sure.
    return body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _describe(error: BaseException) -> str:
    text = str(error).strip()
    cause = error.__cause__ or error.__context__
    if not text and cause is not None:
        text = str(cause).strip() or type(cause).__name__
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


@hookimpl
def relay_config_schema() -> dict[str, type]:
    return {"spam": SpamSettings}


@hookimpl
def relay_filter_factory(register: Callable[[str, Callable[[FilterSpec], Any]], None]) -> None:
    def factory(edit: bool) -> Callable[[FilterSpec], SpamFilter]:
        def make(spec: FilterSpec) -> SpamFilter:
            relay = spec.relay
            settings = relay.plugin_settings("spam") if relay is not None else SpamSettings()
            reject_code = relay.plugin_settings("filters").reject_code if relay is not None else 550
            return SpamFilter(spec, edit=edit, settings=settings, reject_code=reject_code)
        return make

    register("spam", factory(False))
    register("spam-edit", factory(True))
