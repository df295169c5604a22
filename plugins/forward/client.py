"""The SMTP client that forwards messages: aiosmtplib underneath, connections reused per destination.

One transaction per message: MAIL (with SIZE, BODY=8BITMIME and SMTPUTF8 as the message needs and
the server offers), RCPT per recipient with each reply kept, DATA for the accepted ones. STARTTLS
is used when offered (required with ``tls = "required"``). A destination that refuses the
connection or drops it is a temporary failure; with MX routing the next host is tried.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import ssl
import time
from dataclasses import dataclass, field

import aiosmtplib

from mailrelay.cram_md5 import cram_md5_response
from mailrelay.secrets import Secret
from mailrelay_sdk import DeliveryResult, Message, Recipient

from .pipelining import pipelined_transaction

log = logging.getLogger("mailrelay.forward")

IDLE_LIMIT = 20.0  # seconds an unused connection is kept (servers drop idle clients after ~30-300 s)


@dataclass(frozen=True)
class ClientOptions:
    helo: str
    connection_timeout: float = 40.0
    response_timeout: float = 60.0
    client_interface: str = ""
    tls: str = "opportunistic"      # "opportunistic", "required" or "off"
    tls_verify: bool = False
    connections_per_destination: int = 4
    all_or_nothing: bool = False    # --forward-to-all: one refused recipient fails the message
    pipelining: bool = True         # pipeline MAIL/RCPT/DATA when the server offers PIPELINING
    accounts: dict[str, Secret] = field(default_factory=dict)  # --client-auth: client lines by selector


class HopError(Exception):
    """The destination could not be used at all (connect, greeting, EHLO, TLS): try the next one."""


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _status(code: int) -> str:
    return "ok" if 200 <= code < 300 else ("temp" if 400 <= code < 500 else "perm")


def _reply_text(message: str) -> str:
    return " ".join(message.split())


class Destination:
    """Idle connections and a concurrency limit for one host:port and client account (a
    connection is authenticated as one account, so accounts do not share connections)."""

    def __init__(self, host: str, port: int, limit: int, account: Secret | None):
        self.host, self.port, self.account = host, port, account
        self.idle: list[tuple[float, aiosmtplib.SMTP]] = []
        self.slots = asyncio.Semaphore(limit)


class SmtpClient:
    def __init__(self, options: ClientOptions):
        self.options = options
        self._destinations: dict[tuple[str, int], Destination] = {}
        # One context for every connection: building one loads the CA store (~30 ms of CPU).
        self._tls_context: ssl.SSLContext | None = None
        if options.tls != "off":
            self._tls_context = ssl.create_default_context()
            if not options.tls_verify:  # opportunistic TLS: encrypt even without a verifiable certificate
                self._tls_context.check_hostname = False
                self._tls_context.verify_mode = ssl.CERT_NONE

    def _destination(self, host: str, port: int, selector: str) -> Destination:
        key = (host, port, selector)
        if key not in self._destinations:
            account = self.options.accounts.get(selector)
            self._destinations[key] = Destination(host, port, self.options.connections_per_destination,
                                                  account if account is not None and account.authenticates else None)
        return self._destinations[key]

    def account_problem(self, selector: str) -> str:
        """Why a message with this ``ClientAccountSelector`` cannot be sent ("" when it can)."""
        if selector and self.options.accounts and selector not in self.options.accounts:
            return f"4.7.0 no 'client' line with account selector {selector!r} in the --client-auth file"
        return ""

    async def _connect(self, host: str, port: int, account: Secret | None) -> aiosmtplib.SMTP:
        opts = self.options
        client = aiosmtplib.SMTP(
            hostname=host, port=port, local_hostname=opts.helo, timeout=opts.connection_timeout,
            source_address=(opts.client_interface, 0) if opts.client_interface else None,
            start_tls=False, validate_certs=opts.tls_verify, tls_context=self._tls_context)
        try:
            await client.connect()
            await client.ehlo(timeout=opts.response_timeout)
            if opts.tls != "off" and client.supports_extension("starttls"):
                await client.starttls(timeout=opts.response_timeout)
                await client.ehlo(timeout=opts.response_timeout)  # RFC 3207: extensions may change
            elif opts.tls == "required":
                raise HopError(f"{host}:{port} does not offer STARTTLS and TLS is required")
            if account is not None:
                await self._authenticate(client, host, port, account)
        except HopError:
            client.close()
            raise
        except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError) as e:
            client.close()
            raise HopError(f"{host}:{port}: {type(e).__name__}: {e}") from None
        return client

    async def _authenticate(self, client: aiosmtplib.SMTP, host: str, port: int, account: Secret) -> None:
        encrypted = client.get_transport_info("sslcontext") is not None
        if not encrypted and not _is_loopback(host):
            # A password never crosses the network in clear text.
            raise HopError(f"{host}:{port}: not sending credentials without TLS (the server offered no "
                           "STARTTLS, or tls = \"off\")")
        if not client.supports_extension("auth"):
            raise HopError(f"{host}:{port} does not offer AUTH, but --client-auth is configured")
        # One mechanism, the best offered: a wrong password is one failed attempt at the server,
        # not one per mechanism (which trips lockouts). A hashed secret can only do CRAM-MD5.
        offered = [m.lower() for m in client.server_auth_methods]
        usable = ("cram-md5",) if account.kind == "md5" else ("plain", "login", "cram-md5")
        mechanism = next((m for m in usable if m in offered), None)
        if mechanism is None:
            raise HopError(f"{host}:{port} offers no AUTH mechanism this account can use "
                           f"({', '.join(m.upper() for m in usable)}): {' '.join(offered) or 'none'}")
        try:
            if account.kind == "md5":
                await self._cram_md5(client, account)
            else:
                method = getattr(client, f"auth_{mechanism.replace('-', '')}")
                await method(account.name, account.secret, timeout=self.options.response_timeout)
        except aiosmtplib.SMTPAuthenticationError as e:
            raise HopError(f"{host}:{port}: authentication failed: {e.code} {_reply_text(e.message)}") from None

    async def _cram_md5(self, client: aiosmtplib.SMTP, account: Secret) -> None:
        """RFC 2195 with E-MailRelay's hashed secret (aiosmtplib's CRAM-MD5 needs the password)."""
        timeout = self.options.response_timeout
        reply = await client.execute_command(b"AUTH", b"CRAM-MD5", timeout=timeout)
        if reply.code != 334:
            raise aiosmtplib.SMTPAuthenticationError(reply.code, reply.message)
        try:
            challenge = base64.b64decode(reply.message.strip(), validate=True)
        except ValueError:
            raise aiosmtplib.SMTPAuthenticationError(reply.code, "malformed CRAM-MD5 challenge") from None
        reply = await client.execute_command(cram_md5_response(account.name, account, challenge).encode("ascii"),
                                             timeout=timeout)
        if reply.code != 235:
            raise aiosmtplib.SMTPAuthenticationError(reply.code, reply.message)

    async def _checkout(self, dest: Destination) -> aiosmtplib.SMTP:
        now = time.monotonic()
        while dest.idle:
            since, client = dest.idle.pop()
            if client.is_connected and now - since < IDLE_LIMIT:
                return client
            client.close()
        return await self._connect(dest.host, dest.port, dest.account)

    async def send(self, hosts: list[tuple[str, int]], message: Message,
                   recipients: list[Recipient]) -> list[DeliveryResult]:
        """Try ``hosts`` in order until one takes the transaction; one result per recipient."""
        selector = message.envelope.client_account_selector
        problem = self.account_problem(selector)
        if problem:
            return [DeliveryResult(r, "temp", 451, problem) for r in recipients]
        last_error = "no destination"
        for host, port in hosts:
            dest = self._destination(host, port, selector if selector in self.options.accounts else "")
            async with dest.slots:
                try:
                    client = await self._checkout(dest)
                except HopError as e:
                    last_error = str(e)
                    log.info("id=%s cannot use %s:%d: %s", message.id, host, port, e)
                    continue
                try:
                    results = await self._transaction(client, message, recipients)
                except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError,
                        asyncio.TimeoutError) as e:
                    client.close()
                    last_error = f"{host}:{port}: connection lost: {e}"
                    continue
                if client.is_connected:
                    dest.idle.append((time.monotonic(), client))
                return [DeliveryResult(r.recipient, r.status, r.code, r.text + f" (from {host}:{port})")
                        if r.status != "ok" else r for r in results]
        return [DeliveryResult(r, "temp", 451, f"4.4.1 {last_error}") for r in recipients]

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
