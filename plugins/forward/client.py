"""The SMTP client that forwards messages: aiosmtplib underneath, connections reused per destination.

One transaction per message: MAIL (with SIZE, BODY=8BITMIME and SMTPUTF8 as the message needs and
the server offers), RCPT per recipient with each reply kept, DATA for the accepted ones. STARTTLS
is used when offered (required with ``tls = "required"``). A destination that refuses the
connection or drops it is a temporary failure; with MX routing the next host is tried.

Each :class:`Hop` says how much TLS it needs (:class:`TlsRequirement`): the ``[forward] tls``
setting by default, secured as the ``--client-tls...`` options say (``client_tls.py``: implicit
TLS, a client certificate, verification, SNI); for MX hosts MTA-STS may demand a certificate
that verifies for the host name and DANE one that matches its TLSA records (see ``security.py``).
A hop may go through a SOCKS proxy (``socks.py``). Logging in is ``client_auth.py``.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from dataclasses import dataclass, field, replace

import aiosmtplib

from mailrelay.secrets import Secret
from mailrelay_sdk import DeliveryResult, Message, Recipient

from . import dane
from .client_auth import MechanismPreference, authenticate
from .client_tls import ClientTls, build_context, name_problem, open_socket
from .hop import DEFAULT_TLS, SECURITY_STATUS, Hop, HopError, TlsRequirement
from .pipelining import pipelined_transaction
from .socks import SocksError, open_through

__all__ = ["ClientOptions", "SmtpClient", "Hop", "HopError", "TlsRequirement", "DEFAULT_TLS"]

log = logging.getLogger("mailrelay.forward")

IDLE_LIMIT = 20.0  # seconds an unused connection is kept (servers drop idle clients after ~30-300 s)


@dataclass(frozen=True)
class ClientOptions:
    helo: str
    connection_timeout: float = 40.0
    response_timeout: float = 60.0
    client_interface: str = ""
    tls: str = "opportunistic"      # "opportunistic", "required" or "off"
    tls_setup: ClientTls = ClientTls()  # how: implicit TLS, client certificate, verification, SNI
    connections_per_destination: int = 4
    all_or_nothing: bool = False    # --forward-to-all: one refused recipient fails the message
    pipelining: bool = True         # pipeline MAIL/RCPT/DATA when the server offers PIPELINING
    accounts: dict[str, Secret] = field(default_factory=dict)  # --client-auth: client lines by selector
    auth_preference: MechanismPreference = MechanismPreference()  # --client-auth-config
    ca_file: str = ""               # [mta_sts] ca_file: trusted besides the system's CAs for "verify"
    strict_tls: bool = False        # MTA-STS or DANE on: build their TLS contexts at start-up


def _status(code: int) -> str:
    return "ok" if 200 <= code < 300 else ("temp" if 400 <= code < 500 else "perm")


def _reply_text(message: str) -> str:
    return " ".join(message.split())


class Destination:
    """Idle connections and a concurrency limit for one hop and client account (a connection
    is authenticated as one account, and secured for one requirement, so neither is shared)."""

    def __init__(self, hop: Hop, limit: int, account: Secret | None):
        self.hop, self.account = hop, account
        self.idle: list[tuple[float, aiosmtplib.SMTP]] = []
        self.slots = asyncio.Semaphore(limit)


class SmtpClient:
    def __init__(self, options: ClientOptions):
        self.options = options
        self._destinations: dict[tuple[Hop, str], Destination] = {}
        # One context per kind for every connection, built here (blocking: the plugin calls this in
        # a worker thread): loading a CA store takes ~30 ms of CPU, and a bad file is a start-up error.
        setup = options.tls_setup
        self._tls_context: ssl.SSLContext | None = None
        if options.tls != "off":
            # Without verification: encrypt even without a verifiable certificate (opportunistic TLS).
            self._tls_context = build_context(setup, verify=setup.verifies, ca=setup.ca)
        self._contexts: dict[str, ssl.SSLContext] = {}
        if options.strict_tls:
            self._context("verify")
            self._context("encrypt")

    def _context(self, level: str) -> ssl.SSLContext:
        """The context for ``encrypt``/``dane`` (no PKIX check: DANE checks TLSA itself) or ``verify``."""
        level = "verify" if level == "verify" else "encrypt"
        if level not in self._contexts:
            self._contexts[level] = build_context(
                self.options.tls_setup, verify=level == "verify", extra_ca=self.options.ca_file,
                check_hostname=level == "verify")
        return self._contexts[level]

    def _tls_for(self, hop: Hop) -> tuple[ssl.SSLContext, str]:
        """The context for ``hop``'s handshake and the server name sent in it (SNI)."""
        need = hop.tls
        if need.level == "default":
            assert self._tls_context is not None
            return self._tls_context, self.options.tls_setup.server_name or hop.name or hop.host
        return self._context(need.level), need.name or hop.host

    def _destination(self, hop: Hop, selector: str) -> Destination:
        key = (hop, selector)
        if key not in self._destinations:
            account = self.options.accounts.get(selector)
            self._destinations[key] = Destination(hop, self.options.connections_per_destination,
                                                  account if account is not None and account.authenticates else None)
        return self._destinations[key]

    def account_problem(self, selector: str) -> str:
        """Why a message with this ``ClientAccountSelector`` cannot be sent ("" when it can)."""
        if selector and self.options.accounts and selector not in self.options.accounts:
            return f"4.7.0 no 'client' line with account selector {selector!r} in the --client-auth file"
        return ""

    @property
    def _implicit_tls(self) -> bool:
        return self.options.tls_setup.connection and self.options.tls != "off"

    async def _connect(self, hop: Hop, account: Secret | None) -> aiosmtplib.SMTP:
        opts = self.options
        sock = None
        if hop.proxy is not None:
            try:
                sock = await open_through(hop.proxy, hop.host, hop.port, timeout=opts.connection_timeout,
                                          local_address=opts.client_interface)
            except SocksError as e:
                raise HopError(str(e)) from None
        hostname, context = hop.host, self._tls_context
        if self._implicit_tls:
            # aiosmtplib sends its hostname as the server name; a socket of our own lets that be the
            # SNI name while the connection goes to the hop's address.
            context, hostname = self._tls_for(hop)
            sock = sock or await open_socket(hop, opts.connection_timeout, opts.client_interface)
        client = aiosmtplib.SMTP(
            hostname=hostname, port=None if sock else hop.port, sock=sock, local_hostname=opts.helo,
            timeout=opts.connection_timeout,
            source_address=(opts.client_interface, 0) if opts.client_interface and not sock else None,
            use_tls=self._implicit_tls, start_tls=False, validate_certs=False, tls_context=context)
        try:
            try:
                await client.connect()
            except aiosmtplib.SMTPConnectError as e:
                if isinstance(e.__cause__, ssl.SSLError):
                    raise self._tls_error(hop, e.__cause__) from None
                raise
            await client.ehlo(timeout=opts.response_timeout)
            if self._implicit_tls:
                self._check_peer(client, hop, hostname)
            else:
                await self._starttls(client, hop)
            if account is not None:
                await authenticate(client, hop, account, opts.auth_preference, opts.response_timeout)
        except HopError:
            client.close()
            raise
        except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError) as e:
            client.close()
            raise HopError(f"{hop}: {type(e).__name__}: {e}") from None
        finally:
            if sock is not None and not client.is_connected:
                sock.close()  # aiosmtplib owns it once connected; before that, nobody else closes it
        return client

    def _tls_error(self, hop: Hop, e: ssl.SSLError) -> HopError:
        """A failed handshake, with what was being checked."""
        need = hop.tls
        if need.level != "default":
            if isinstance(e, ssl.SSLCertVerificationError):
                return HopError(f"{hop}: the certificate does not verify for {need.name} as the {need.source} "
                                f"requires: {e.verify_message or e.reason}", SECURITY_STATUS)
            return HopError(f"{hop}: TLS failed ({need.source}): {e}", SECURITY_STATUS)
        if isinstance(e, ssl.SSLCertVerificationError):
            return HopError(f"{hop}: the server certificate does not verify against the CAs of "
                            f"{self.options.tls_setup.describe()}: {e.verify_message or e.reason}",
                            SECURITY_STATUS)
        return HopError(f"{hop}: TLS handshake failed: {e.reason or e}", SECURITY_STATUS)

    def _check_peer(self, client: aiosmtplib.SMTP, hop: Hop, server_name: str) -> None:
        """After the handshake: the name ``--client-tls-verify-name`` (or ``tls_verify``) asks for,
        and a DANE hop's TLSA match."""
        need = hop.tls
        if need.level == "dane":
            ssl_object = client.get_transport_info("ssl_object")
            chain = dane.peer_chain(ssl_object) if ssl_object is not None else []
            problem = dane.check_certificate(chain, need.tlsa, (need.name, *need.extra_names))
            if problem:
                raise HopError(f"{hop}: certificate rejected by the {need.source}: {problem}", SECURITY_STATUS)
            return
        name = self.options.tls_setup.name_to_check(server_name) if need.level == "default" else ""
        if name:
            problem = name_problem(client.get_transport_info("peercert"), name)
            if problem:
                raise HopError(f"{hop}: the server certificate is not for {name}: {problem}", SECURITY_STATUS)

    async def _starttls(self, client: aiosmtplib.SMTP, hop: Hop) -> None:
        """STARTTLS as the hop requires, then the certificate checks its requirement asks for."""
        need, timeout = hop.tls, self.options.response_timeout
        if need.level == "default":
            if self.options.tls == "off" or not client.supports_extension("starttls"):
                if self.options.tls == "required":
                    raise HopError(f"{hop} does not offer STARTTLS and TLS is required")
                return
        elif not client.supports_extension("starttls"):
            raise HopError(f"{hop} does not offer STARTTLS, which the {need.source} requires", SECURITY_STATUS)
        context, server_name = self._tls_for(hop)
        try:
            await client.starttls(server_hostname=server_name, tls_context=context, timeout=timeout)
        except ssl.SSLError as e:
            raise self._tls_error(hop, e) from None
        except aiosmtplib.SMTPServerDisconnected as e:  # e.g. the server's alert for a version it refuses
            cause = e.__cause__
            raise (self._tls_error(hop, cause) if isinstance(cause, ssl.SSLError) else
                   HopError(f"{hop}: TLS handshake failed{f' ({need.source})' if need.source else ''}: {e}",
                            SECURITY_STATUS)) from None
        except aiosmtplib.SMTPException as e:
            if need.level == "default":
                raise
            raise HopError(f"{hop}: TLS failed ({need.source}): {e}", SECURITY_STATUS) from None
        self._check_peer(client, hop, server_name)
        await client.ehlo(timeout=timeout)  # RFC 3207: extensions may change

    async def _checkout(self, dest: Destination) -> aiosmtplib.SMTP:
        now = time.monotonic()
        while dest.idle:
            since, client = dest.idle.pop()
            if client.is_connected and now - since < IDLE_LIMIT:
                return client
            client.close()
        return await self._connect(dest.hop, dest.account)

    async def send(self, hops: list[Hop] | list[tuple[str, int]], message: Message,
                   recipients: list[Recipient]) -> list[DeliveryResult]:
        """Try ``hops`` in order until one takes the transaction; one result per recipient.

        A hop whose requirement is only being tested (MTA-STS ``testing``) and fails it is logged
        and tried again without the requirement."""
        selector = message.envelope.client_account_selector
        problem = self.account_problem(selector)
        if problem:
            return [DeliveryResult(r, "temp", 451, problem) for r in recipients]
        last_error = HopError("no destination")
        for hop in hops:
            hop = hop if isinstance(hop, Hop) else Hop(*hop)
            try:
                return await self._send_via(hop, selector, message, recipients)
            except HopError as e:
                last_error = e
                if not (hop.tls.testing and e.status == SECURITY_STATUS):  # a dead host stays dead
                    log.info("id=%s cannot use %s: %s", message.id, hop, e)
                    continue
                log.warning("id=%s %s (testing mode, so delivering without it): %s", message.id,
                            hop.tls.source, e)
            try:
                return await self._send_via(replace(hop, tls=TlsRequirement(name=hop.name)), selector,
                                            message, recipients)
            except HopError as e:
                last_error = e
                log.info("id=%s cannot use %s: %s", message.id, hop, e)
        return [DeliveryResult(r, "temp", 451, f"{last_error.status} {last_error}") for r in recipients]

    async def _send_via(self, hop: Hop, selector: str, message: Message,
                        recipients: list[Recipient]) -> list[DeliveryResult]:
        """The transaction over one hop; HopError when the hop cannot be used."""
        dest = self._destination(hop, selector if selector in self.options.accounts else "")
        async with dest.slots:
            client = await self._checkout(dest)
            try:
                results = await self._transaction(client, message, recipients)
            except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError,
                    asyncio.TimeoutError) as e:
                client.close()
                raise HopError(f"{hop}: connection lost: {e}") from None
            if client.is_connected:
                dest.idle.append((time.monotonic(), client))
            return [DeliveryResult(r.recipient, r.status, r.code, r.text + f" (from {hop})")
                    if r.status != "ok" else r for r in results]

    async def _transaction(self, client: aiosmtplib.SMTP, message: Message,
                           recipients: list[Recipient]) -> list[DeliveryResult]:
        envelope = message.envelope
        utf8 = not (envelope.sender.isascii() and all(r.address.isascii() for r in recipients))
        options: list[str] = []
        if client.supports_extension("size"):
            options.append(f"SIZE={len(message.content)}")
        if envelope.content == "8bit":
            if not client.supports_extension("8bitmime"):
                return [DeliveryResult(r, "perm", 554, "5.6.3 the next hop does not support 8BITMIME and "
                                       "the message has 8-bit content") for r in recipients]
            options.append("BODY=8BITMIME")
        if utf8:
            if not client.supports_extension("smtputf8"):
                return [DeliveryResult(r, "perm", 553, "5.6.7 the next hop does not support SMTPUTF8, "
                                       "needed for this message's addresses") for r in recipients]
            options.append("SMTPUTF8")
        encoding = "utf-8" if utf8 else "ascii"
        addresses = [envelope.sender, *(r.address for r in recipients)]
        if any(c in a for a in addresses for c in "\r\n\0<>"):
            return [DeliveryResult(r, "perm", 501, "5.1.3 address contains characters that cannot be sent")
                    for r in recipients]
        if self.options.pipelining and client.supports_extension("pipelining"):
            return await self._pipelined(client, message, recipients, options, encoding)
        timeout = self.options.response_timeout
        try:
            await client.mail(envelope.sender, options=options, encoding=encoding, timeout=timeout)
        except aiosmtplib.SMTPSenderRefused as e:
            await self._reset(client)
            return [DeliveryResult(r, _status(e.code), e.code, _reply_text(e.message)) for r in recipients]
        results: dict[str, DeliveryResult] = {}
        accepted: list[Recipient] = []
        for recipient in recipients:
            try:
                await client.rcpt(recipient.address, encoding=encoding, timeout=timeout)
                accepted.append(recipient)
            except aiosmtplib.SMTPRecipientRefused as e:
                results[recipient.address] = DeliveryResult(recipient, _status(e.code), e.code, _reply_text(e.message))
        return await self._finish(client, message, recipients, accepted, results)

    async def _pipelined(self, client: aiosmtplib.SMTP, message: Message, recipients: list[Recipient],
                         options: list[str], encoding: str) -> list[DeliveryResult]:
        def command(verb: bytes, address: str, extra: list[str]) -> bytes:
            return b" ".join([verb + b"<" + address.encode(encoding) + b">", *(o.encode() for o in extra)])

        replies = await pipelined_transaction(
            client, command(b"MAIL FROM:", message.envelope.sender, options),
            [command(b"RCPT TO:", r.address, []) for r in recipients], message.content,
            self.options.response_timeout, send_data=not self.options.all_or_nothing)
        mail = replies.mail
        if not 200 <= mail.code < 300:
            await self._reset(client)
            return [DeliveryResult(r, _status(mail.code), mail.code, _reply_text(mail.message)) for r in recipients]
        results: dict[str, DeliveryResult] = {}
        accepted: list[Recipient] = []
        for recipient, reply in zip(recipients, replies.rcpts):
            if 200 <= reply.code < 300:
                accepted.append(recipient)
            else:
                results[recipient.address] = DeliveryResult(recipient, _status(reply.code), reply.code,
                                                            _reply_text(reply.message))
        if replies.data is None:  # DATA was held back (--forward-to-all): decide now
            return await self._finish(client, message, recipients, accepted, results)
        outcome = replies.final or replies.data
        if replies.final is None:
            await self._reset(client)
        for r in accepted:
            results[r.address] = DeliveryResult(r, _status(outcome.code), outcome.code, _reply_text(outcome.message))
        return [results[r.address] for r in recipients]

    async def _finish(self, client: aiosmtplib.SMTP, message: Message, recipients: list[Recipient],
                      accepted: list[Recipient], results: dict[str, DeliveryResult]) -> list[DeliveryResult]:
        """DATA for the accepted recipients (sequential path, or after held-back DATA)."""
        if not accepted or (self.options.all_or_nothing and results):
            await self._reset(client)
            for r in accepted:
                results[r.address] = DeliveryResult(r, "perm", 550, "5.5.0 not sent: other recipients were refused "
                                                    "and --forward-to-all is in effect")
            return [results[r.address] for r in recipients]
        try:
            reply = await client.data(message.content, timeout=self.options.response_timeout)
        except aiosmtplib.SMTPDataError as e:
            for r in accepted:
                results[r.address] = DeliveryResult(r, _status(e.code), e.code, _reply_text(e.message))
        else:
            for r in accepted:
                results[r.address] = DeliveryResult(r, "ok", reply.code, _reply_text(reply.message))
        return [results[r.address] for r in recipients]

    @staticmethod
    async def _reset(client: aiosmtplib.SMTP) -> None:
        try:
            await client.rset()
        except (aiosmtplib.SMTPException, OSError):
            client.close()

    async def close(self) -> None:
        for dest in self._destinations.values():
            for _, client in dest.idle:
                try:
                    await asyncio.wait_for(client.quit(), 2)
                except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError):
                    client.close()
            dest.idle.clear()
