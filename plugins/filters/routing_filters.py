"""``split:`` and ``mx:``: E-MailRelay's message routing by recipient domain (``filter-builtin``).

* ``split:[raw;PORT]`` groups the remote recipients by domain. The message keeps the first
  domain's recipients (and its local ones); every other domain gets a new spool message with
  the same content. Each gets ``ForwardTo: domain`` (``domain:PORT`` with a port word) and, when
  there was more than one domain, ``SplitGroupCount`` / ``SplitGroup`` fields naming the whole
  group. Domains compare case-insensitively unless ``raw``. New messages are written and
  published durably before the filter answers, and ask for a rescan. Other server filters do not
  see them, so ``split:`` belongs at the end of a server chain.
* ``mx:[nst=S;rt=S;DNSADDR[:PORT]]`` turns the ``ForwardTo`` domain (optionally ``:port``, a
  ``user@`` prefix is ignored, an address literal skips DNS) into ``ForwardToAddress``
  (``ip:port``, port 25 by default) by an MX lookup, through the relay's resolver or the DNS
  servers the spec names; ``nst`` is the seconds to wait for a DNS answer, ``rt`` how many more
  before giving up. A DNS failure is a temporary failure; a domain that does not exist or takes
  no mail is a rejection. An answer of ``0.0.0.0`` clears ``ForwardToAddress``. It belongs in
  the client chain (``--filter=split: --client-filter=mx:``) so that addresses are fresh.

Both rewrite the envelope file atomically (temporary file, flush, rename over it).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from dataclasses import replace
from typing import Any

import dns.asyncresolver
import dns.nameserver

from mailrelay_sdk import Envelope, FilterResult, Message, Recipient

from mailrelay.config.loader import ConfigError
from mailrelay.dns import parse_nameserver
from mailrelay.filtering import FilterSpec, FilterSpecError
from mailrelay_plugins.forward.mx import MailHost, MxError, resolve_mail_hosts

from .mailbox import rewrite_envelope

log = logging.getLogger("mailrelay.filters")

SPLIT_FIELDS = ("SplitGroupCount", "SplitGroup")


def _durable(spec: FilterSpec) -> bool:
    return bool(spec.relay.spool.durable) if spec.relay is not None else True


class SplitFilter:
    """``split:``; ``edits_files`` because the message's own envelope changes."""

    edits_files = True

    def __init__(self, spec: FilterSpec):
        self.raw = False
        self.port = ""
        for word in (w.strip() for w in spec.argument.split(";")):
            if not word:
                continue
            if word == "raw":
                self.raw = True
            elif word.isascii() and word.isdigit() and 0 < int(word) < 65536:
                self.port = str(int(word))
            else:
                raise FilterSpecError(f"{spec.text!r}: unknown option {word!r} (known: raw, a port number)")
        if spec.relay is None:
            raise FilterSpecError(f"{spec.text!r}: split: needs the relay's spool")
        self.relay = spec.relay
        self.durable = _durable(spec)
        self.name = spec.text.strip()

    def _key(self, recipient: Recipient) -> str:
        domain = recipient.address.rpartition("@")[2]
        return domain if self.raw else domain.lower()

    def _forward_to(self, recipient: Recipient) -> str:
        domain = recipient.address.rpartition("@")[2]
        return f"{domain}:{self.port}" if self.port else domain

    async def __call__(self, message: Message, stage: Any) -> FilterResult:
        envelope = message.envelope
        groups: dict[str, list[Recipient]] = {}
        for recipient in envelope.remote_recipients:
            groups.setdefault(self._key(recipient), []).append(recipient)
        if not groups:
            log.info("id=%s filter=%s no remote recipients, nothing to split", message.id, self.name)
            return FilterResult.ok()
        domains = sorted(groups)
        spool = self.relay.spool
        ids = [message.id] + [spool.new_id() for _ in domains[1:]]
        extra = tuple((n, v) for n, v in envelope.extra if n not in SPLIT_FIELDS)
        if len(ids) > 1:
            extra += (("SplitGroupCount", str(len(ids))),) + tuple(("SplitGroup", i) for i in ids)
        for domain, new_id in zip(domains[1:], ids[1:]):
            recipients = tuple(groups[domain])
            piece = replace(envelope, recipients=recipients, forward_to=self._forward_to(recipients[0]),
                            extra=extra, reason="", reason_code="")
            await spool.write(new_id, piece, [message.content], commit=True)
            log.info("id=%s filter=%s created %s forward-to=%s rcpts=%d", message.id, self.name, new_id,
                     piece.forward_to, len(recipients))
        first = tuple(groups[domains[0]])
        kept = replace(envelope, recipients=envelope.local_recipients + first,
                       forward_to=self._forward_to(first[0]), extra=extra)
        await asyncio.to_thread(rewrite_envelope, message, kept, durable=self.durable and stage == "client")
        log.info("id=%s filter=%s forward-to=%s%s", message.id, self.name, kept.forward_to,
                 f" (split into {len(ids)} messages)" if len(ids) > 1 else "")
        if len(ids) > 1 and stage == "client" and getattr(self.relay, "queue", None) is not None:
            self.relay.queue.wake()  # the client chain's rescan flag is not acted on by the runner
        return FilterResult(rescan=len(ids) > 1)


def parse_forward_to(value: str) -> tuple[str, int]:
    """``ForwardTo`` to (domain or ``[literal]``, port): ``user@`` ignored, ``:port`` optional,
    a bare IP address becomes a literal. Raises ``ValueError`` for a bad port."""
    text = value.strip().rpartition("@")[2]
    port = 25
    head, colon, tail = text.rpartition(":")
    if _is_ip(text):
        pass  # a bare IPv6 address: its last group is not a port
    elif colon and tail.isascii() and tail.isdigit() and (not head.startswith("[") or head.endswith("]")):
        if not 0 < int(tail) < 65536:
            raise ValueError(f"bad port in ForwardTo {value!r}")
        text, port = head, int(tail)
    if _is_ip(text):
        address = ipaddress.ip_address(text)
        text = f"[{address}]" if address.version == 4 else f"[IPv6:{address}]"
    return text, port


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _pick_address(host: MailHost) -> str:
    # ForwardToAddress holds one address and nothing falls back to another: an IPv4 address of
    # the best host is reachable from more networks than its IPv6 one.
    for address in host.addresses:
        if ipaddress.ip_address(address).version == 4:
            return address
    return host.addresses[0]


def _address_text(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


class MxFilter:
    """``mx:``; ``edits_files`` because it writes ``ForwardToAddress`` into the envelope."""

    edits_files = True

    def __init__(self, spec: FilterSpec):
        nameservers: list[tuple[str, int]] = []
        nst = rt = None
        for word in (w.strip() for w in spec.argument.split(";")):
            if not word:
                continue
            key, eq, number = word.partition("=")
            if eq and key in ("nst", "rt"):
                if not (number.isascii() and number.isdigit() and int(number) > 0):
                    raise FilterSpecError(f"{spec.text!r}: {key}= needs a number of seconds")
                nst, rt = (int(number), rt) if key == "nst" else (nst, int(number))
                continue
            try:
                nameservers.append(parse_nameserver(word))
            except ConfigError:
                raise FilterSpecError(f"{spec.text!r}: {word!r} is neither nst=, rt= nor a DNS server "
                                      "address[:port]") from None
        shared = getattr(spec.relay, "resolver", None)
        if nameservers or nst or rt or shared is None:
            resolver = dns.asyncresolver.Resolver(configure=False)
            if nameservers:
                resolver.nameservers = [dns.nameserver.Do53Nameserver(h, p) for h, p in nameservers]
            elif shared is not None:
                resolver.nameservers = shared.nameservers
            else:
                raise FilterSpecError(f"{spec.text!r}: no DNS server to ask")
            base_timeout = shared.timeout if shared is not None else 5.0
            base_lifetime = shared.lifetime if shared is not None else 10.0
            resolver.timeout = float(nst or base_timeout)
            resolver.lifetime = float(resolver.timeout + rt) if rt else max(base_lifetime, resolver.timeout)
            self.resolver = resolver
        else:
            self.resolver = shared
        self.durable = _durable(spec)
        self.name = spec.text.strip()

    async def __call__(self, message: Message, stage: Any) -> FilterResult:
        envelope = message.envelope
        if not envelope.forward_to.strip():
            return FilterResult.ok()  # nothing to route: the default --forward-to applies
        try:
            domain, port = parse_forward_to(envelope.forward_to)
        except ValueError as e:
            log.error("id=%s filter=%s %s", message.id, self.name, e)
            return FilterResult.reject(f"Cannot route to {envelope.forward_to}", 550, "5.1.2", reason=str(e))
        try:
            hosts = await resolve_mail_hosts(self.resolver, domain)
        except MxError as e:
            log.warning("id=%s filter=%s %s", message.id, self.name, e.message)
            if e.permanent:
                return FilterResult.reject(f"No mail server for {domain}", 550, e.status, reason=e.message)
            return FilterResult.fail(f"DNS lookup for {domain} failed, will retry", 451, e.status, reason=e.message)
        address = _pick_address(hosts[0])
        value = "" if address == "0.0.0.0" else _address_text(address, port)
        log.info("id=%s filter=%s %s -> forward-to-address=%s", message.id, self.name, envelope.forward_to,
                 value or "(cleared)")
        if value != envelope.forward_to_address:
            updated: Envelope = replace(envelope, forward_to_address=value)
            await asyncio.to_thread(rewrite_envelope, message, updated, durable=self.durable and stage == "client")
        return FilterResult.ok()
