"""``dkim-sign``: DKIM signatures for our own mail, ARC seals for mail we relay.

    [dkim]
    domain = "example.com"                      # default: the --domain
    selector = "mail2025"                       # RSA: mail2025._domainkey.example.com
    key = "/etc/mailrelay/dkim-example.com-mail2025.pem"
    ed25519_selector = "ed2025"                 # optional second signature (RFC 8463)
    ed25519_key = "/etc/mailrelay/dkim-example.com-ed2025.pem"

    [dkim.domains."example.org"]                # more signing domains, same four keys
    selector = "mail"
    key = "/etc/mailrelay/dkim-example.org-mail.pem"

Signing happens at the client stage, after every filter that may edit the message (this hook is
``trylast``), on the message in memory: the spool file is never rewritten, so a crash between
signing and delivery cannot leave a signature behind to be doubled, and each attempt signs what
it sends. A signature of ours that is already there and valid is kept rather than repeated.

Only mail from an authenticated client, a trusted network (``[dkim] networks``, by default relay
control's ``[relay] networks``) or the relay itself (bounces) is signed, and only with the keys of
its ``From:`` domain (or a parent domain with keys); anything else passes unsigned with a log line.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
from typing import Any, Callable, TypeVar

import click
import dkim

from mailrelay.config.loader import ConfigError
from mailrelay_sdk import FilterResult, Message, hookimpl

from .headers import header_section_has
from .keygen import dkim_cli
from .keys import DkimKey, load_key
from .settings import ArcSettings, DkimSettings, KeySpec, Network, is_trusted, normalise_domain, trusted_networks
from .signing import Signer, seal, self_test

log = logging.getLogger("mailrelay.mailauth")
INLINE_HASHING = 64 * 1024  # octets: larger messages are hashed in the worker thread too
T = TypeVar("T")


class DkimSignPlugin:
    """One instance per relay (the entry point names the class)."""

    def __init__(self) -> None:
        self.executor: concurrent.futures.ThreadPoolExecutor | None = None
        self.signer: Signer | None = None
        self.networks: tuple[Network, ...] = ()
        self.arc_key: DkimKey | None = None
        self.authserv_id = ""

    @hookimpl
    def relay_config_schema(self) -> dict[str, type]:
        return {"dkim": DkimSettings, "arc": ArcSettings}

    @hookimpl
    def relay_cli(self, cli: click.Group) -> None:
        cli.add_command(dkim_cli)

    @hookimpl
    async def relay_startup(self, relay: Any) -> None:
        settings: DkimSettings = relay.plugin_settings("dkim")
        not_signable = sorted(set(settings.headers) & {h.decode() for h in dkim.DKIM.SHOULD_NOT})
        if not_signable:
            raise ConfigError(f"[dkim] headers: {', '.join(not_signable)} must not be signed (RFC 6376 5.4)")
        specs = settings.key_specs(relay.domain)
        keys = await asyncio.to_thread(_load_all, specs)
        # A few threads of its own: the default executor's many threads would fight over the GIL.
        self.executor = concurrent.futures.ThreadPoolExecutor(min(4, os.cpu_count() or 1), thread_name_prefix="dkim")
        self.signer = Signer(keys, settings.headers, settings.oversign)
        self.networks = trusted_networks(settings.network_list, relay)
        arc: ArcSettings = relay.plugin_settings("arc")
        if arc.seal:
            self.arc_key = await asyncio.to_thread(_arc_key, arc, specs, keys)
        mailauth = relay.settings.extra.get("mailauth")
        self.authserv_id = (getattr(mailauth, "authserv_id", "") or relay.domain).lower()
        log.info("dkim signing: %s; for clients authenticated or in %s; arc sealing: %s",
                 "; ".join(f"d={k.domain} s={k.selector} {k.algorithm.decode()}" for k in keys),
                 ",".join(map(str, self.networks)) or "(no network)",
                 f"d={self.arc_key.domain} s={self.arc_key.selector} over {self.authserv_id} results"
                 if self.arc_key else "off")

    @hookimpl
    def relay_shutdown(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
            self.executor = None

    async def _in_thread(self, function: Callable[..., T], *args: Any) -> T:
        assert self.executor is not None
        return await asyncio.get_running_loop().run_in_executor(self.executor, function, *args)

    @hookimpl(trylast=True)
    async def on_filter(self, message: Message, stage: str) -> FilterResult | None:
        if stage != "client" or self.signer is None:
            return None
        envelope = message.envelope
        # Who sent it is in the envelope: the SMTP session is long gone at the client stage.
        eligible = bool(envelope.authentication) or is_trusted(envelope.client, self.networks)
        content: bytes | None = None
        if eligible:
            content = await self._sign(message)
        else:
            log.debug("id=%s dkim: not signed: client %s neither authenticated nor trusted", message.id,
                      envelope.client)
        if self.arc_key is not None and header_section_has(content or message.content, b"authentication-results"):
            content = await self._seal(message, content or message.content) or content
        return FilterResult.ok(content=content) if content is not None else None

    async def _sign(self, message: Message) -> bytes | None:
        """The new content, or None. Hashing a small message costs less than a thread hop, so it
        happens here; RSA runs in a worker thread, where OpenSSL does not hold the GIL."""
        assert self.signer is not None
        try:
            if len(message.content) <= INLINE_HASHING:
                prepared = self.signer.prepare(message.content)
            else:
                prepared = await self._in_thread(self.signer.prepare, message.content)
            if any(key.type == "rsa" for key, _, _ in prepared.pending):
                signatures = await self._in_thread(Signer.compute, prepared)
            else:  # Ed25519 alone takes less time than handing it to a thread
                signatures = Signer.compute(prepared)
        except dkim.DKIMException as e:  # a message dkimpy cannot parse: sent unsigned, never held
            log.warning("id=%s dkim: not signed: %s", message.id, e)
            return None
        # Signing is the normal case (debug); a message that leaves unsigned says why (info).
        log.log(logging.DEBUG if prepared.pending else logging.INFO, "id=%s dkim: %s", message.id, prepared.note)
        if not prepared.pending:
            return prepared.content if prepared.content != message.content else None
        return Signer.finish(prepared, signatures)

    async def _seal(self, message: Message, content: bytes) -> bytes | None:
        assert self.arc_key is not None
        try:
            sealed = await self._in_thread(seal, content, self.arc_key, self.authserv_id)
        except dkim.DKIMException as e:
            log.warning("id=%s arc: not sealed: %s", message.id, e)
            return None
        if sealed is not None:
            log.info("id=%s arc: sealed d=%s s=%s", message.id, self.arc_key.domain, self.arc_key.selector)
        return sealed


def _load_all(specs: list[KeySpec]) -> list[DkimKey]:
    keys = []
    for spec in specs:
        where = "[dkim]" if spec is specs[0] else f"[dkim.domains.{spec.domain!r}]"
        if spec.key:
            keys.append(load_key(spec.key, spec.domain, spec.selector, "rsa", f"{where} key"))
        if spec.ed25519_key:
            keys.append(load_key(spec.ed25519_key, spec.domain, spec.ed25519_selector, "ed25519",
                                 f"{where} ed25519_key"))
    for key in keys:
        try:
            self_test(key)
        except RuntimeError as e:
            raise ConfigError(str(e)) from None
    return keys


def _arc_key(arc: ArcSettings, specs: list[KeySpec], keys: list[DkimKey]) -> DkimKey | None:
    """The key ARC seals with (RFC 8617 knows only rsa-sha256): ``[arc]``'s own, else the RSA key
    of ``[dkim]``'s first domain."""
    if arc.key or arc.selector:
        if not (arc.key and arc.selector):
            raise ConfigError("[arc]: selector and key go together")
        domain = normalise_domain(arc.domain or specs[0].domain, "[arc] domain")
        key = load_key(arc.key, domain, arc.selector, "rsa", "[arc] key")
        try:
            self_test(key)
        except RuntimeError as e:
            raise ConfigError(str(e)) from None
        return key
    first = [k for k in keys if k.type == "rsa" and k.domain == specs[0].domain]
    if not first:
        log.warning("arc sealing is off: [dkim] has no RSA key for %s and [arc] names none", specs[0].domain)
        return None
    return first[0]
