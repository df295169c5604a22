"""``mailauth``: SPF at MAIL FROM, DKIM, ARC and DMARC after DATA, one Authentication-Results header.

    [mailauth]
    temperror = "defer"     # DNS time-out or SERVFAIL: 451 4.7.x; "tag": accept and say so
    [spf]
    fail = "reject"         # 550 5.7.23; "tag": accept with spf=fail in the header
    [dmarc]
    reject = "reject"       # p=reject: 550 5.7.1; "tag"
    quarantine = "tag"      # p=quarantine: "quarantine" holds the message as .envelope.bad

The client address is the session's, which behind a load balancer is the one the PROXY header
named. Authenticated clients and trusted networks (relay control's) are not checked unless
``exempt_trusted = false``: their mail is ours, signed on the way out. ``Authentication-Results``
fields that claim our authserv-id are removed from every message, checked or not.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

from publicsuffixlist import PublicSuffixList

from mailrelay.config.loader import ConfigError
from mailrelay_sdk import Message, Session, Transaction, Verdict, hookimpl

from . import headers as hdr
from .dkim_verify import ArcResult, DkimResult, verify_arc, verify_dkim
from .dmarc import Dmarc, DmarcResult
from .dnsquery import Dns
from .results_header import build, strip_ours
from .settings import DmarcSettings, MailauthSettings, Network, SpfSettings, is_trusted, trusted_networks
from .spf import SpfChecker, SpfResult

log = logging.getLogger("mailrelay.mailauth")
SPF_NOTE = "mailauth.spf"          # transaction.notes: the SpfResult of MAIL FROM
RESULTS_NOTE = "mailauth.results"  # message.notes: (spf, dkim, dmarc, arc) for later plugins
_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]*")


class MailauthPlugin:
    """One instance per relay (the entry point names the class)."""

    def __init__(self) -> None:
        self.settings = MailauthSettings()
        self.spf_settings = SpfSettings()
        self.dmarc_settings = DmarcSettings()
        self.authserv_id = ""
        self.networks: tuple[Network, ...] = ()
        self.dns: Dns | None = None
        self.spf: SpfChecker | None = None
        self.dmarc: Dmarc | None = None

    @hookimpl
    def relay_config_schema(self) -> dict[str, type]:
        return {"mailauth": MailauthSettings, "spf": SpfSettings, "dmarc": DmarcSettings}

    @hookimpl
    async def relay_startup(self, relay: Any) -> None:
        self.settings = s = relay.plugin_settings("mailauth")
        self.spf_settings = relay.plugin_settings("spf")
        self.dmarc_settings = relay.plugin_settings("dmarc")
        self.authserv_id = (s.authserv_id or relay.domain).lower()
        if not _TOKEN.fullmatch(self.authserv_id):
            raise ConfigError(f"[mailauth] authserv_id: {self.authserv_id!r} is not a host name")
        self.networks = trusted_networks(s.network_list, relay)
        self.dns = Dns(relay.resolver, s.cache_size)
        self.spf = SpfChecker(self.dns, receiver=relay.domain)
        self.dmarc = Dmarc(self.dns, await asyncio.to_thread(PublicSuffixList))
        # The checks keep to their own limit, and answer temperror past it; the hook must outlast it.
        for hook in ("on_mail_from", "on_receive"):
            relay.hooks.allow_time(hook, s.timeout + 5)
        log.info("mailauth: authserv-id %s; spf %s (fail=%s); dmarc %s (reject=%s, quarantine=%s); "
                 "temperror=%s; %s", self.authserv_id, "on" if self.spf_settings.enabled else "off",
                 self.spf_settings.fail, "on" if self.dmarc_settings.enabled else "off", self.dmarc_settings.reject,
                 self.dmarc_settings.quarantine, s.temperror,
                 "not checking authenticated clients and " + ",".join(map(str, self.networks))
                 if s.exempt_trusted else "checking every client")

    def _exempt(self, session: Session | None) -> str:
        """Why ``session`` is not checked (``""``: it is)."""
        if session is None:
            return "made by the relay"
        if not self.settings.exempt_trusted:
            return ""
        if session.auth_user:
            return f"authenticated as {session.auth_user}"
        if session.notes.get("trusted") or is_trusted(session.peer_ip, self.networks):
            return "trusted client"
        return ""

    # ---------------------------------------------------------------- SPF at MAIL FROM
    @hookimpl
    async def on_mail_from(self, session: Session, transaction: Transaction, address: str) -> Verdict | None:
        if not self.spf_settings.enabled or self._exempt(session):
            return None
        assert self.spf is not None
        result = await self._spf(session, address)
        transaction.notes[SPF_NOTE] = result
        where = f"session={session.id} client={session.peer_ip} spf={result.result} " \
                f"{result.identity}={result.sender}"
        if result.result == "fail" and self.spf_settings.fail == "reject":
            log.warning("%s mechanism=%s: refused", where, result.mechanism)
            text = f"SPF: {result.domain} does not allow {session.peer_ip} to send its mail"
            if result.explanation:
                text += f": {result.explanation}"
            return Verdict.deny(text, code=550, enhanced="5.7.23", reason=f"spf fail ({result.mechanism})")
        if result.result == "permerror" and self.spf_settings.permerror == "reject":
            log.warning("%s (%s): refused", where, result.problem)
            return Verdict.deny(f"SPF: the record of {result.domain} is broken", code=550, enhanced="5.7.24",
                                reason=f"spf permerror: {result.problem}")
        if result.result == "temperror" and self.settings.temperror == "defer":
            log.warning("%s (%s): deferred", where, result.problem)
            return Verdict.deny_soft(f"SPF: could not check {result.domain} now (DNS), try again later",
                                     code=451, enhanced="4.7.24", reason=f"spf temperror: {result.problem}")
        log.debug("%s%s", where, f" ({result.problem})" if result.problem else "")  # on_receive logs it
        return None

    async def _spf(self, session: Session, address: str) -> SpfResult:
        assert self.spf is not None
        try:
            async with asyncio.timeout(self.settings.timeout):
                return await self.spf.check(session.peer_ip, address, session.helo)
        except TimeoutError:
            problem = f"no answer within {self.settings.timeout:g}s"
        except ValueError:  # no IP address (a Unix socket): nothing for SPF to judge
            return SpfResult("none", "mailfrom", "", address, problem="no client IP address")
        domain = address.rpartition("@")[2] if address else session.helo
        return SpfResult("temperror", "mailfrom" if address else "helo", domain.lower(),
                         address or f"postmaster@{session.helo}", problem=problem)

    # ---------------------------------------------------------------- DKIM, ARC, DMARC after DATA
    @hookimpl
    async def on_receive(self, message: Message) -> Verdict | None:
        content, removed = strip_ours(message.content, self.authserv_id)
        session = message.session
        if removed:
            log.info("session=%s removed %d Authentication-Results field(s) claiming %s", session.id if session
                     else "-", removed, self.authserv_id)
        if self._exempt(session):
            if removed:
                message.replace_content(content)
            return None
        assert session is not None and self.dns is not None and self.dmarc is not None
        transaction = message.transaction
        spf = transaction.notes.get(SPF_NOTE) if transaction is not None else None
        dkim, arc, dmarc = await self._check(content, spf)
        message.replace_content(build(self.authserv_id, spf, dkim, dmarc, arc) + content)
        message.notes[RESULTS_NOTE] = (spf, dkim, dmarc, arc)
        verdict = self._verdict(dmarc)
        log.log(logging.WARNING if verdict is not None else logging.INFO,
                "session=%s client=%s mailauth spf=%s dkim=%s dmarc=%s%s arc=%s -> %s", session.id, session.peer_ip,
                spf.result if spf else "-",
                ",".join(f"{d.result}:{d.domain}" for d in dkim) or "none",
                dmarc.result if dmarc else "-", f"(p={dmarc.policy},from={dmarc.from_domain})" if dmarc else "",
                arc.result, verdict.reply() if verdict is not None else "accepted")
        return verdict

    async def _check(self, content: bytes, spf: SpfResult | None) -> tuple[list[DkimResult], ArcResult,
                                                                          DmarcResult | None]:
        assert self.dns is not None and self.dmarc is not None
        try:
            async with asyncio.timeout(self.settings.timeout):
                dkim, arc = await asyncio.gather(verify_dkim(content, self.dns, self.settings.max_signatures),
                                                 verify_arc(content, self.dns))
                dmarc = None
                if self.dmarc_settings.enabled:
                    fields, _ = hdr.split(content)
                    domains, count = hdr.from_domains(fields)
                    dmarc = await self.dmarc.evaluate(domains, count, spf, dkim)
        except TimeoutError:
            problem = f"no answer within {self.settings.timeout:g}s"
            return ([DkimResult("temperror", problem=problem)], ArcResult("temperror", problem=problem),
                    DmarcResult("temperror", policy="", problem=problem) if self.dmarc_settings.enabled else None)
        return dkim, arc, dmarc

    def _verdict(self, dmarc: DmarcResult | None) -> Verdict | None:
        """What the operator's policy makes of the DMARC result (SPF's was applied at MAIL FROM)."""
        if dmarc is None:
            return None
        where = f"From: {dmarc.from_domain}" if dmarc.from_domain else "the From: address"
        failed = f"dmarc fail p={dmarc.policy} from={dmarc.from_domain}"
        if dmarc.result == "fail" and dmarc.disposition == "reject" and self.dmarc_settings.reject == "reject":
            return Verdict.deny(f"DMARC: {where} is not authenticated (SPF and DKIM fail to align) and its "
                                "policy is reject", code=550, enhanced="5.7.1", reason=failed)
        if dmarc.result == "fail" and dmarc.disposition == "quarantine" and \
                self.dmarc_settings.quarantine == "quarantine":
            return Verdict.quarantine(failed)
        # DNS trouble matters where a policy might have refused the message: an unknown policy
        # (""), or a known one that is not "none".
        if dmarc.result == "temperror" and dmarc.policy != "none":
            if self.settings.temperror == "defer":
                return Verdict.deny_soft(f"DMARC: could not check {where} now (DNS), try again later", code=451,
                                         enhanced="4.7.0", reason=f"dmarc temperror: {dmarc.problem}")
        return None
