"""The ``dnsbl`` plugin's hooks: check each connecting client, then refuse it or tag its mail."""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

import dns.asyncresolver
import dns.nameserver

from mailrelay.config.loader import ConfigError
from mailrelay_sdk import Event, Message, Session, Verdict, hookimpl

from .lookup import TXT_MIN_TIME, Checker, Outcome, client_address
from .settings import DnsblSettings

log = logging.getLogger("mailrelay.dnsbl")

HEADER = "X-DNSBL"
MAX_REPLY_TEXT = 500              # with "554 5.7.1 " and CRLF within RFC 5321's 512 octets
OUTCOME_NOTE = "dnsbl"            # session.notes: the Outcome, for other plugins
HEADERS_NOTE = "dnsbl.headers"    # session.notes: the header lines tag mode adds to each message


class DnsblPlugin:
    """One instance per relay (the entry point names the class)."""

    def __init__(self) -> None:
        self.settings: DnsblSettings | None = None
        self.checker: Checker | None = None
        self.relay: Any = None

    @hookimpl
    def relay_config_schema(self) -> dict[str, type]:
        return {"dnsbl": DnsblSettings}

    @hookimpl
    def relay_startup(self, relay: Any) -> None:
        s: DnsblSettings = relay.plugin_settings("dnsbl")
        if not s.servers:
            # Checked here, not in the settings: the core builds every plugin's defaults.
            raise ConfigError("[dnsbl] servers: no lists given (set servers, or --dnsbl LIST,...)")
        self.settings, self.relay = s, relay
        resolver = relay.resolver
        if s.nameserver is not None:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [dns.nameserver.Do53Nameserver(*s.nameserver)]
            resolver.timeout = resolver.lifetime = s.timeout
        self.checker = Checker(resolver, s.servers, s.timeout, s.cache_size)
        # The explanation (TXT) for a rejection may follow the lookups themselves.
        relay.hooks.allow_time("on_connect", s.timeout + max(TXT_MIN_TIME, min(s.timeout, 5.0)) + 1)
        if not relay.settings.smtp.remote_clients and any(
                ipaddress.ip_address("127.0.0.1") in net for net in s.networks):
            log.warning("dnsbl: only loopback clients are served (no --remote-clients) and [dnsbl] allow "
                        "exempts loopback: no client will be looked up")
        log.info("dnsbl lists=%s threshold=%d timeout=%gs%s mode=%s dns=%s allow=%s", ",".join(s.servers),
                 s.threshold, s.timeout, " fail_closed" if s.fail_closed else "", s.mode,
                 s.dns_server or "relay", ",".join(map(str, s.networks)) or "-")

    @hookimpl
    async def relay_shutdown(self) -> None:
        if self.checker is not None:
            await self.checker.close()

    # ---------------------------------------------------------------- the check
    @hookimpl
    async def on_connect(self, session: Session) -> Verdict | None:
        s, checker = self.settings, self.checker
        assert s is not None and checker is not None
        address = client_address(session.peer_ip)
        if address is None or any(address in net for net in s.networks):
            log.debug("session=%s client=%s dnsbl=skipped (allowed network)", session.id, session.peer_ip)
            return None
        # Tag mode names every list in its headers, so it waits for all of them.
        outcome = await checker.check(address, enough=s.threshold if s.mode == "reject" else 0)
        session.notes[OUTCOME_NOTE] = outcome
        self._log_answers(session, outcome)
        hits = outcome.hits
        listed = " ".join(f"{a.zone}={'+'.join(a.codes)}" for a in hits)
        if s.threshold == 0 or len(hits) < s.threshold:
            if hits:
                log.info("session=%s client=%s dnsbl listed=%s count=%d threshold=%d action=none",
                         session.id, address, listed, len(hits), s.threshold)
            if s.fail_closed and s.mode == "reject" and s.threshold and \
                    len(hits) + len(outcome.unanswered) >= s.threshold:
                log.warning("session=%s client=%s dnsbl refused: lists gave no usable answer (fail_closed)",
                            session.id, address)
                return Verdict.deny_soft("Block list lookups did not finish, try again later", code=421,
                                         enhanced="4.7.0", reason="dnsbl time-out (fail_closed)")
            return None
        self._emit(session, address, listed)
        if s.mode == "tag":
            session.notes[HEADERS_NOTE] = b"".join(
                f"{HEADER}: zone={a.zone}; ip={address}; result={'+'.join(a.codes)}\r\n".encode()
                for a in hits)
            log.warning("session=%s client=%s dnsbl listed=%s action=tag", session.id, address, listed)
            return None
        first = hits[0]
        text = await checker.explanation(address, first)
        log.warning("session=%s client=%s dnsbl listed=%s action=reject", session.id, address, listed)
        reply = f"Client address [{address}] blocked using {first.zone}" + (f": {text}" if text else "")
        return Verdict.deny(reply[:MAX_REPLY_TEXT], code=554, enhanced="5.7.1", reason=f"dnsbl listed {listed}")

    @staticmethod
    def _log_answers(session: Session, outcome: Outcome) -> None:
        for answer in outcome.answers:
            if answer.problem:
                log.warning("session=%s client=%s dnsbl=%s %s; not counted", session.id, outcome.address,
                            answer.zone, answer.problem)
            elif answer.ignored:
                log.warning("session=%s client=%s dnsbl=%s answered %s, an error signal rather than a "
                            "listing (127.0.0.0/8, except 127.0.0.1 and 127.255.255.x); not counted",
                            session.id, outcome.address, answer.zone, ",".join(answer.ignored))
            else:
                state = ("listed " + ",".join(answer.codes) if answer.listed else
                         "not waited for" if answer.skipped else "not listed")
                log.debug("session=%s client=%s dnsbl=%s %s", session.id, outcome.address, answer.zone, state)

    def _emit(self, session: Session, address: Any, listed: str) -> None:
        assert self.settings is not None
        self.relay.hooks.emit(Event("dnsbl.listed", session_id=session.id, data={
            "client": str(address), "lists": listed, "action": self.settings.mode}))

    # ---------------------------------------------------------------- tag mode
    @hookimpl
    def on_receive(self, message: Message) -> None:
        """Tag mode: the headers go in first, so that filters weigh them (``spam:`` included)."""
        headers = _headers_for(message)
        if headers and not message.content.startswith(headers):
            message.replace_content(headers + message.content)


def _headers_for(message: Message) -> bytes:
    session = message.session
    return session.notes.get(HEADERS_NOTE, b"") if session is not None else b""
