"""The SMTP wire protocol: aiosmtpd's server, tightened where a relay on port 25 needs it.

aiosmtpd provides the connection, the command loop, STARTTLS and AUTH plumbing. This subclass
replaces the commands whose behaviour a relay must control: EHLO (PIPELINING, ENHANCEDSTATUSCODES),
MAIL (null reverse-path, SIZE, BODY, SMTPUTF8), RCPT (100-recipient limit) and DATA (a reader that
only ever ends at CRLF.CRLF, enforces SIZE and the 1000-octet line limit, and is fast: data.py);
STARTTLS (starttls.py), AUTH (auth.py), slow-client deadlines (deadlines.py) and the PROXY
header (proxy.py) are mixins of :class:`RelaySMTP`. Slow clients are bounded (slowloris):
besides the idle timeout, a command line must be complete ``[smtp] command_timeout`` seconds after
its first octet, and DATA gets that long plus one second per ``min_data_rate`` octets; either
overrun is ``421 4.4.2`` and the end of the connection.
Every decision is delegated to :class:`~mailrelay.smtp.reception.Reception`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from aiosmtpd.smtp import SMTP

from .. import logs
from ..types import Action, Recipient, Session, Transaction, Verdict
from .addresses import AddressError, parse_command_path
from .auth import SmtpAuth
from .data import DATA_TOO_SLOW, DataReader
from .deadlines import CommandDeadline
from .proxy import PROXY_HEADER_TIMEOUT, UNTRUSTED_PROXY, ProxyHeader
from .starttls import SmtpTls

if TYPE_CHECKING:  # pragma: no cover
    from ..config.settings import SmtpSettings
    from .reception import Reception
    from .server import SmtpServer

log = logging.getLogger("mailrelay.smtp")

COMMAND_LINE_LIMIT = 510      # RFC 5321 4.5.3.1.4: 512 octets including CRLF
MAIL_EXTENSION_ALLOWANCE = 26 + 10 + 14 + 500  # SIZE, SMTPUTF8, BODY, AUTH= (RFC 1870, 6531, 4954)
AUTH_LINE_LIMIT = 12288       # RFC 4954 4: AUTH initial responses may be long
_HELO_ARGUMENT = re.compile(r"[^\x00-\x20\x7f]{1,255}")
SHUTDOWN_REPLY = "421 4.3.2 Service shutting down, try again later"


class _NoHandler:
    """aiosmtpd wants a handler object; every command it would pass on is overridden here."""


class RelaySMTP(SmtpTls, SmtpAuth, DataReader, CommandDeadline, ProxyHeader, SMTP):
    """One client connection."""

    def __init__(self, reception: Reception, settings: SmtpSettings, server: SmtpServer, *,
                 hostname: str, **kwargs: Any):
        super().__init__(
            _NoHandler(),
            data_size_limit=settings.size or None,
            enable_SMTPUTF8=settings.smtputf8,
            hostname=hostname,
            ident="ESMTP" if "server" in settings.anonymous else "ESMTP mailrelay",
            timeout=settings.idle_timeout,
            proxy_protocol_timeout=PROXY_HEADER_TIMEOUT if server.proxy_protocol else None,
            auth_require_tls=False,  # what is offered before TLS is the auth plugins' decision (auth.py)
            loop=asyncio.get_running_loop(),
            **kwargs,
        )
        self.reception = reception
        self.settings = settings
        self.server = server
        # aiosmtpd keeps these limits in a class-level dict that every EHLO grows; ours are fixed.
        self.command_size_limit = COMMAND_LINE_LIMIT
        self.command_size_limits = collections.defaultdict(
            lambda: COMMAND_LINE_LIMIT,
            {"MAIL": COMMAND_LINE_LIMIT + MAIL_EXTENSION_ALLOWANCE,
             "RCPT": COMMAND_LINE_LIMIT + MAIL_EXTENSION_ALLOWANCE, "AUTH": AUTH_LINE_LIMIT})
        self._smtp_methods = {name: self._tracked(method, name) for name, method in self._smtp_methods.items()}
        self.relay_session: Session | None = None
        self.transaction: Transaction | None = None
        self.messages_accepted = 0
        self._busy = False
        self._closing = False
        self._greeted = False
        self._lost = False
        self._refused = False
        self._reading_data = False
        self._command_due: float | None = None   # when the command line being read must be complete
        self._command_timer: asyncio.TimerHandle | None = None
        self._idle_deadline = 0.0
        self.counted_as: str | None = None  # the address the server counts this session under
        self._handle_hooks["PROXY"] = self._proxy_header

    # ---------------------------------------------------------------- connection lifecycle
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        starting = self.transport is None
        super().connection_made(transport)
        if starting:
            peer = transport.get_extra_info("peername") or ("", 0)
            sock = transport.get_extra_info("sockname") or ("", 0)
            if isinstance(peer, str):  # a Unix socket
                peer = ("", 0)
            self.relay_session = Session(peer_ip=str(peer[0]), peer_port=int(peer[1] or 0),
                                         local_ip=str(sock[0]) if isinstance(sock, tuple) else "",
                                         local_port=int(sock[1]) if isinstance(sock, tuple) else 0)
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is not None:  # an implicit-TLS listener: the loop did the handshake
                self._tls_established(transport, ssl_object)
            refusal = self.server.session_started(self)
            if refusal is None and self.server.proxy_protocol and not self.server.trusts_proxy(str(peer[0])):
                log.warning("session=%s client=%s refused: not a trusted proxy (trusted_proxies)",
                            self.relay_session.id, self.relay_session.peer_ip)
                refusal = UNTRUSTED_PROXY
            if refusal is not None:
                self._refused = True
                transport.write(refusal.encode() + b"\r\n")  # type: ignore[attr-defined]
                transport.close()

    async def _handle_client(self) -> None:
        logs.bind_client(self.relay_session)  # this session's task: --log-address names its client
        await super()._handle_client()

    def connection_lost(self, error: Exception | None) -> None:
        # Once only: after a failed TLS handshake both we and the TLS layer may report the loss.
        if self._lost:
            return
        self._lost = True
        self._cancel_command_timer()
        self.server.session_ended(self)
        super().connection_lost(error)

    def _cb_client_connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super()._cb_client_connected(reader, writer)
        # RFC 5321 2.3.8: only CRLF ends a line. aiosmtpd reads commands up to a bare LF; make
        # the command reader's default separator CRLF (DATA already asks for CRLF explicitly).
        plain_readuntil = reader.readuntil

        async def readuntil(separator: bytes = b"\r\n") -> bytes:
            if reader._buffer and self._command_due is None:  # type: ignore[attr-defined]
                self._start_command_deadline()  # a partial line left over from a pipelined batch
            line = await plain_readuntil(separator)
            self._stop_command_deadline()
            if reader._buffer:  # type: ignore[attr-defined]
                self._start_command_deadline()  # the next line has begun
            return line

        reader.readuntil = readuntil  # type: ignore[method-assign]

    async def push(self, status: Any) -> None:
        # The first reply is the 220 greeting; on_connect runs just before it, after aiosmtpd has
        # read any PROXY header (_proxy_header), so limits and plugins see the real client.
        if not self._greeted:
            self._greeted = True
            if self._refused:
                return
            refusal = self.server.client_identified(self)
            if refusal is not None:
                await super().push(refusal)
                self._close()
                return
            verdict = await self.reception.connect(self.relay_session)  # type: ignore[arg-type]
            if not verdict.accepted:
                code = verdict.code if verdict.action is Action.DENY else 421
                enhanced = verdict.enhanced if verdict.action is Action.DENY else "4.7.0"
                await super().push(f"{code} {enhanced} {verdict.text}")
                self._close()
                return
        await super().push(status)

    def _tracked(self, method: Callable[[Any], Awaitable[None]], command: str
                 ) -> Callable[[Any], Awaitable[None]]:
        async def run(arg: Any) -> None:
            if self._needs_tls_first(command):
                await self.push("530 5.7.0 Must issue a STARTTLS command first")
                return
            self._busy = True
            try:
                await method(arg)
            finally:
                self._busy = False
                if self._closing and self.transport is not None:
                    await self._goodbye()
        return run

    def begin_shutdown(self) -> asyncio.Task[None] | None:
        """Server is stopping: an idle session gets 421 now (the returned task), a busy one after
        its current command."""
        self._closing = True
        if not self._busy and self.transport is not None:
            return asyncio.get_running_loop().create_task(self._goodbye())
        return None

    async def _goodbye(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        try:
            self._writer.write(SHUTDOWN_REPLY.encode() + b"\r\n")
            await asyncio.wait_for(self._writer.drain(), 2)
        except (ConnectionError, asyncio.TimeoutError):
            pass
        self._close()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _timeout_cb(self) -> None:
        # RFC 5321 4.5.3.2: tell the client why before closing an idle connection.
        if self.transport is not None and not self.transport.is_closing():
            self._writer.write(b"421 4.4.2 Idle timeout, closing connection\r\n")
        super()._timeout_cb()

    async def _reply(self, verdict: Verdict, ok: str) -> bool:
        """Send ``ok`` (or an OK verdict's own text) when accepted, else the verdict's reply."""
        if verdict.accepted:
            custom = verdict.action is Action.OK and verdict.text != "OK"
            await self.push(verdict.reply() if custom else ok)
            return True
        await self.push(verdict.reply())
        if verdict.action is Action.DISCONNECT:
            self._close()
        return False

    # ---------------------------------------------------------------- greeting commands
    async def smtp_EHLO(self, hostname: str | None) -> None:
        await self._helo(hostname, esmtp=True)

    async def smtp_HELO(self, hostname: str | None) -> None:
        await self._helo(hostname, esmtp=False)

    async def _helo(self, hostname: str | None, *, esmtp: bool) -> None:
        name = "EHLO" if esmtp else "HELO"
        if not hostname or not _HELO_ARGUMENT.fullmatch(hostname):
            # A domain or address literal: no spaces or control characters (the argument is
            # echoed in our reply and in the Received: header).
            await self.push(f"501 5.5.4 Syntax: {name} hostname")
            return
        session = self.relay_session
        assert session is not None
        self.transaction = None  # RFC 5321 4.1.4: EHLO/HELO reset the transaction
        verdict = await self.reception.helo(session, hostname)
        if not verdict.accepted:
            await self._reply(verdict, "")
            return
        session.helo, session.esmtp = hostname, esmtp
        self.session.host_name = hostname
        self.session.extended_smtp = esmtp
        if not esmtp:
            await self.push(f"250 {self.hostname}")
            return
        lines = [self.hostname if "server" in self.settings.anonymous else f"{self.hostname} greets {hostname}"]
        if self.settings.pipelining:
            lines.append("PIPELINING")
        lines.append(f"SIZE {self.settings.size}" if self.settings.size else "SIZE")
        lines.append("8BITMIME")
        if self.settings.smtputf8:
            lines.append("SMTPUTF8")
        lines.append("ENHANCEDSTATUSCODES")
        if self._starttls_offered:
            lines.append("STARTTLS")
        mechanisms = await self.offered_mechanisms()
        if mechanisms:
            lines.append("AUTH " + " ".join(mechanisms))
        lines.append("HELP")
        await self.push("\r\n".join(f"250{'-' if i < len(lines) - 1 else ' '}{line}"
                                    for i, line in enumerate(lines)))

    async def _need_helo(self) -> bool:
        if not self.session.host_name:
            await self.push("503 5.5.1 Send HELO or EHLO first")
            return True
        return False

    # ---------------------------------------------------------------- transaction commands
    async def smtp_MAIL(self, arg: str | None) -> None:
        if await self._need_helo():
            return
        if self.transaction is not None:
            await self.push("503 5.5.1 Nested MAIL command")
            return
        try:
            path = parse_command_path(arg, "FROM:", strict=self.settings.strict_parsing, allow_null=True)
        except AddressError as e:
            await self.push(e.reply)
            return
        if path.params and not self.session.extended_smtp:
            await self.push("501 5.5.4 Parameters need EHLO")
            return
        params = dict(path.params)
        transaction = Transaction(sender=path.address)
        body = params.pop("BODY", None)
        if body is not None:
            if body.upper() not in ("7BIT", "8BITMIME"):
                await self.push("501 5.5.4 BODY must be 7BIT or 8BITMIME")
                return
            transaction.body = "7bit" if body.upper() == "7BIT" else "8bit"
        if "SMTPUTF8" in params:
            if params.pop("SMTPUTF8") is not None or not self.settings.smtputf8:
                await self.push("555 5.5.4 SMTPUTF8 is not available or takes no value")
                return
            transaction.smtputf8 = True
        size = params.pop("SIZE", None)
        if size is not None:
            if not size.isdigit():
                await self.push("501 5.5.4 SIZE must be a number")
                return
            transaction.size_hint = int(size)
            if self.settings.size and int(size) > self.settings.size:
                await self.push(f"552 5.3.4 Message size exceeds fixed maximum message size "
                                f"({self.settings.size} octets)")
                return
        auth = params.pop("AUTH", None)
        if auth is not None and self.relay_session and self.relay_session.auth_user:
            transaction.auth_param = auth  # RFC 4954 5: kept only for authenticated clients
        if params:
            await self.push(f"555 5.5.4 Unsupported MAIL parameter {next(iter(params))}")
            return
        if path.non_ascii and not transaction.smtputf8:
            await self.push("553 5.6.7 Non-ASCII address needs the SMTPUTF8 parameter")
            return
        verdict = await self.reception.mail_from(self.relay_session, transaction)  # type: ignore[arg-type]
        if await self._reply(verdict, "250 2.1.0 Sender OK"):
            self.transaction = transaction

    async def smtp_RCPT(self, arg: str | None) -> None:
        if await self._need_helo():
            return
        transaction = self.transaction
        if transaction is None:
            await self.push("503 5.5.1 Need MAIL before RCPT")
            return
        try:
            path = parse_command_path(arg, "TO:", strict=self.settings.strict_parsing)
        except AddressError as e:
            await self.push(e.reply)
            return
        if path.params:
            await self.push(f"555 5.5.4 Unsupported RCPT parameter {next(iter(path.params))}")
            return
        if path.non_ascii and not transaction.smtputf8:
            await self.push("553 5.6.7 Non-ASCII address needs the SMTPUTF8 parameter")
            return
        if len(transaction.recipients) >= self.settings.max_recipients:
            await self.push("452 4.5.3 Too many recipients")
            return
        recipient = Recipient(path.address)
        verdict = await self.reception.rcpt_to(self.relay_session, transaction, recipient)  # type: ignore[arg-type]
        if await self._reply(verdict, "250 2.1.5 Recipient OK"):
            transaction.recipients.append(verdict.recipient or recipient)

    async def smtp_RSET(self, arg: str | None) -> None:
        if arg:
            await self.push("501 5.5.4 Syntax: RSET")
            return
        self.transaction = None
        await self.push("250 2.0.0 OK")

    async def smtp_NOOP(self, arg: str | None) -> None:
        await self.push("250 2.0.0 OK")

    async def smtp_VRFY(self, arg: str | None) -> None:
        if "vrfy" in self.settings.anonymous:
            await self.push("502 5.5.1 VRFY is disabled")
            return
        address = (arg or "").strip()
        if address[-9:].upper() == " SMTPUTF8":  # RFC 6531 3.7.4.2
            address = address[:-9].rstrip()
        if address.startswith("<") and address.endswith(">"):
            address = address[1:-1]
        if not address or any(ord(c) < 0x20 or ord(c) == 0x7F for c in address):
            await self.push("501 5.5.4 Syntax: VRFY <address>")
            return
        verdict = await self.reception.vrfy(self.relay_session, address)  # type: ignore[arg-type]
        if not verdict.decisive:
            await self.push("252 2.5.2 Cannot verify the user, but will accept the message")
            return
        await self.push(verdict.reply())
        if verdict.action is Action.DISCONNECT:
            self._close()

    async def smtp_QUIT(self, arg: str | None) -> None:
        if arg:
            await self.push("501 5.5.4 Syntax: QUIT")
            return
        await self.push(f"221 2.0.0 {self.hostname} closing connection")
        self._close()

    async def smtp_DATA(self, arg: str | None) -> None:
        if await self._need_helo():
            return
        transaction = self.transaction
        if transaction is None:
            await self.push("503 5.5.1 Need MAIL before DATA")
            return
        if not transaction.recipients:
            await self.push("554 5.5.1 No valid recipients")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        self._reading_data = True  # the command-line deadline does not apply to message data
        try:
            body, problem = await self._read_data()
        finally:
            self._reading_data = False
        self.transaction = None
        if body is None:
            await self.push(problem)
            if problem == DATA_TOO_SLOW:
                self._close()
            return
        reply = await self.reception.data(self.relay_session, transaction, body)  # type: ignore[arg-type]
        self.messages_accepted += reply.startswith("250")
        await self.push(reply)
