"""The SMTP wire protocol: aiosmtpd's server, tightened where a relay on port 25 needs it.

aiosmtpd provides the connection, the command loop, STARTTLS and AUTH plumbing. This subclass
replaces the commands whose behaviour a relay must control: EHLO (PIPELINING, ENHANCEDSTATUSCODES),
MAIL (null reverse-path, SIZE, BODY, SMTPUTF8), RCPT (100-recipient limit) and DATA (a reader
that only ever ends at CRLF.CRLF, enforces SIZE and the 1000-octet line limit, and is fast) and
STARTTLS (``loop.start_tls``, so uvloop does the TLS when it runs the loop; anything the client
sent after STARTTLS in clear text is discarded, and the session starts over as RFC 3207 4.2 says).
Slow clients are bounded (slowloris): besides the idle timeout, a command line must be complete
``[smtp] command_timeout`` seconds after its first octet, and DATA gets that long plus one second
per ``min_data_rate`` octets; either overrun is ``421 4.4.2`` and the end of the connection.
With ``[server] proxy_protocol`` the connection starts with a PROXY header from a trusted proxy,
and the session's address is the client's that the header names.
Every decision is delegated to :class:`~mailrelay.smtp.reception.Reception`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import ssl
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from aiosmtpd.proxy_protocol import AF, V2_CMD, ProxyData
from aiosmtpd.smtp import SMTP

from ..tls import peer_subject
from ..types import Action, Recipient, Session, Transaction, Verdict
from .addresses import AddressError, parse_command_path
from .auth import SmtpAuth

if TYPE_CHECKING:  # pragma: no cover
    from ..config.settings import SmtpSettings
    from .reception import Reception
    from .server import SmtpServer

log = logging.getLogger("mailrelay.smtp")

COMMAND_LINE_LIMIT = 510      # RFC 5321 4.5.3.1.4: 512 octets including CRLF
TEXT_LINE_LIMIT = 998         # RFC 5321 4.5.3.1.6: 1000 octets including CRLF
MAIL_EXTENSION_ALLOWANCE = 26 + 10 + 14 + 500  # SIZE, SMTPUTF8, BODY, AUTH= (RFC 1870, 6531, 4954)
AUTH_LINE_LIMIT = 12288       # RFC 4954 4: AUTH initial responses may be long
DATA_END = b"\r\n.\r\n"
READ_CHUNK = 65536
_HELO_ARGUMENT = re.compile(r"[^\x00-\x20\x7f]{1,255}")
SHUTDOWN_REPLY = "421 4.3.2 Service shutting down, try again later"
ALLOWED_BEFORE_TLS = {"EHLO", "STARTTLS", "NOOP", "QUIT"}  # RFC 3207 4, with --server-tls-required
TLS_HANDSHAKE_TIMEOUT = 30.0
TLS_SHUTDOWN_TIMEOUT = 2.0  # a client that never answers our close_notify must not hold up a shutdown
PROXY_HEADER_TIMEOUT = 10.0  # the proxy sends its header at once
COMMAND_TOO_SLOW = "421 4.4.2 Command not completed in time, closing connection"
DATA_TOO_SLOW = "421 4.4.2 Message data arriving too slowly, closing connection"
UNTRUSTED_PROXY = "421 4.7.0 Connections are accepted only through a trusted proxy"


class _NoHandler:
    """aiosmtpd wants a handler object; every command it would pass on is overridden here."""


class RelaySMTP(SmtpAuth, SMTP):
    """One client connection."""

    def __init__(self, reception: Reception, settings: SmtpSettings, server: SmtpServer, *,
                 hostname: str, **kwargs: Any):
        super().__init__(
            _NoHandler(),
            data_size_limit=settings.size or None,
            enable_SMTPUTF8=settings.smtputf8,
            hostname=hostname,
            ident="ESMTP mailrelay",
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
        self._command_deadline: asyncio.TimerHandle | None = None
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

    def connection_lost(self, error: Exception | None) -> None:
        # Once only: after a failed TLS handshake both we and the TLS layer may report the loss.
        if self._lost:
            return
        self._lost = True
        self._stop_command_deadline()
        self.server.session_ended(self)
        super().connection_lost(error)

    def _cb_client_connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super()._cb_client_connected(reader, writer)
        # RFC 5321 2.3.8: only CRLF ends a line. aiosmtpd reads commands up to a bare LF; make
        # the command reader's default separator CRLF (DATA already asks for CRLF explicitly).
        plain_readuntil = reader.readuntil

        async def readuntil(separator: bytes = b"\r\n") -> bytes:
            if reader._buffer and self._command_deadline is None:  # type: ignore[attr-defined]
                self._start_command_deadline()  # a partial line left over from a pipelined batch
            line = await plain_readuntil(separator)
            self._stop_command_deadline()
            if reader._buffer:  # type: ignore[attr-defined]
                self._start_command_deadline()  # the next line has begun
            return line

        reader.readuntil = readuntil  # type: ignore[method-assign]

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._command_deadline is None and not self._reading_data:
            self._start_command_deadline()

    def _start_command_deadline(self) -> None:
        self._command_deadline = self.loop.call_later(self.settings.command_timeout, self._command_overdue)

    def _stop_command_deadline(self) -> None:
        if self._command_deadline is not None:
            self._command_deadline.cancel()
            self._command_deadline = None

    def _command_overdue(self) -> None:
        self._command_deadline = None
        buffered = self._reader._buffer  # type: ignore[attr-defined]
        if self._reading_data or not buffered or b"\r\n" in buffered:
            return  # a whole line is waiting for us, not the client for its end
        if self.transport is not None and not self.transport.is_closing():
            session = self.relay_session
            log.info("session=%s client=%s dropped: command line incomplete after %gs (command_timeout)",
                     session.id if session else "-", session.peer_ip if session else "-",
                     self.settings.command_timeout)
            self._writer.write(COMMAND_TOO_SLOW.encode() + b"\r\n")
            self._close()

    async def _proxy_header(self, server: Any, session: Any, envelope: Any, proxy: ProxyData) -> bool:
        """aiosmtpd's PROXY hook: a valid header from a trusted proxy names the real client."""
        relay_session = self.relay_session
        assert relay_session is not None
        if proxy.command == V2_CMD.LOCAL or proxy.family not in (AF.INET, AF.INET6) or proxy.src_addr is None:
            # A health check (v2 LOCAL) or "PROXY UNKNOWN": the connection is the proxy's own.
            log.info("session=%s proxy=%s no client address in the PROXY header", relay_session.id,
                     relay_session.peer_ip)
            return True
        proxy_ip = relay_session.peer_ip
        relay_session.peer_ip, relay_session.peer_port = str(proxy.src_addr), int(proxy.src_port or 0)
        relay_session.local_ip, relay_session.local_port = str(proxy.dst_addr), int(proxy.dst_port or 0)
        log.info("session=%s client=%s port=%d proxy=%s PROXY v%s", relay_session.id, relay_session.peer_ip,
                 relay_session.peer_port, proxy_ip, proxy.version)
        return True

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
        lines = [f"{self.hostname} greets {hostname}"]
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

    # ---------------------------------------------------------------- TLS
    @property
    def _starttls_offered(self) -> bool:
        tls = self.server.tls
        return tls is not None and tls.starttls and not (self.relay_session and self.relay_session.tls)

    def _needs_tls_first(self, command: str) -> bool:
        # --server-tls-required, loopback clients included: RFC 3207 4's short list before TLS.
        tls = self.server.tls
        return (tls is not None and tls.settings.required and command not in ALLOWED_BEFORE_TLS
                and not (self.relay_session and self.relay_session.tls))

    async def smtp_STARTTLS(self, arg: str | None) -> None:
        if arg:
            await self.push("501 5.5.4 Syntax: STARTTLS")
        elif self.relay_session is not None and self.relay_session.tls:
            await self.push("503 5.5.1 TLS is already active")
        elif not self._starttls_offered:
            await self.push("454 4.7.0 TLS not available")
        else:
            # No drain between the reply and start_tls(): it stops reading from the socket before
            # the loop runs again, so the client's handshake cannot land in the command buffer.
            self._writer.write(b"220 2.0.0 Ready to start TLS\r\n")
            await self._start_tls()

    async def _start_tls(self) -> None:
        """STARTTLS handshake; on failure the connection is closed."""
        tls, session, plain = self.server.tls, self.relay_session, self.transport
        assert tls is not None and session is not None and plain is not None
        # Clear text the client sent after STARTTLS is discarded (the command injection known
        # from CVE-2011-0411). Now, not after the handshake: by then the buffer may already hold
        # the client's first command over TLS.
        self._reader._buffer.clear()  # type: ignore[attr-defined]
        transport: asyncio.BaseTransport | None = None
        problem: object = "connection closed during the handshake"
        try:
            transport = await self.loop.start_tls(plain, self, tls.context, server_side=True,
                                                  ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT,
                                                  ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT)
        except (OSError, EOFError, asyncio.TimeoutError) as e:  # ssl.SSLError is an OSError
            problem = e
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        if transport is None or ssl_object is None or transport.is_closing():
            log.info("session=%s client=%s TLS handshake failed: %s", session.id, session.peer_ip, problem)
            plain.close()
            self.connection_lost(None)
            return
        # aiosmtpd's streams write to and pause the TLS transport from now on.
        self.transport = self._transport = self._reader._transport = self._writer._transport = transport  # type: ignore[attr-defined]
        self._over_ssl = True
        self._tls_established(transport, ssl_object)

    def _tls_established(self, transport: asyncio.BaseTransport, ssl_object: ssl.SSLObject) -> None:
        """The session starts over (RFC 3207 4.2): no HELO, transaction or AUTH survive, and the
        session records the cipher and the client's certificate (PEM, as E-MailRelay keeps it)."""
        session = self.relay_session
        assert session is not None
        self._tls_protocol = transport  # type: ignore[assignment]  # aiosmtpd (AUTH) asks only if set
        self._set_rset_state()
        peer, self.session = self.session.peer, self._create_session()
        self.session.peer = peer
        self.session.ssl = {"ssl_object": ssl_object, "cipher": ssl_object.cipher(),
                            "peercert": ssl_object.getpeercert()}
        self.transaction = None
        session.helo, session.esmtp, session.auth_user, session.auth_mechanism = "", False, "", ""
        session.tls, session.tls_cipher = True, (ssl_object.cipher() or ("",))[0]
        der = ssl_object.getpeercert(binary_form=True)
        session.client_certificate = ssl.DER_cert_to_PEM_cert(der) if der else ""
        self._reset_timeout()
        log.info("session=%s client=%s TLS %s cipher=%s%s", session.id, session.peer_ip,
                 ssl_object.version(), session.tls_cipher,
                 f" client-certificate={peer_subject(ssl_object.getpeercert())!r}" if der else "")

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

    async def _read_data(self) -> tuple[bytes | None, str]:
        """Read up to CRLF.CRLF; return (unstuffed content, "") or (None, error reply).

        Only the exact sequence CRLF "." CRLF ends the data (so ``\\n.\\n``, ``\\r.\\r`` and mixed
        forms are content, and SMTP smuggling cannot split one message into two). An over-size
        or over-long message is read to its end and discarded before the error reply, as
        RFC 5321 4.2.5 implies. Data that falls behind ``min_data_rate`` (after a first
        ``command_timeout`` of grace) is :data:`DATA_TOO_SLOW`, and the connection must end.
        """
        rate = self.settings.min_data_rate
        start = self.loop.time() + self.settings.command_timeout
        reader = self._reader
        limit = self.settings.size
        buf = bytearray(b"\r\n")  # the CRLF that ended the DATA command, so "." on line one ends too
        scan_from = 0
        too_big = False
        received = 0
        while True:
            end = buf.find(DATA_END, scan_from)
            if end >= 0:
                break
            try:
                async with asyncio.timeout_at(start + received / rate if rate else None):
                    chunk = await reader.read(READ_CHUNK)
            except TimeoutError:
                log.info("session=%s client=%s dropped: DATA slower than %d octets/s (min_data_rate)",
                         self.relay_session.id if self.relay_session else "-",
                         self.relay_session.peer_ip if self.relay_session else "-", rate)
                return None, DATA_TOO_SLOW
            if not chunk:
                raise ConnectionResetError("connection closed during DATA")
            received += len(chunk)
            if limit and not too_big and received > limit + len(DATA_END):
                too_big = True
            if too_big:
                del buf[:-4]  # keep only what could start the end marker
            scan_from = max(0, len(buf) - 4)
            buf += chunk
            self._reset_timeout()
        leftover = bytes(buf[end + len(DATA_END):])
        if leftover:
            # Pipelined commands after the end of data: give them back to the command reader.
            reader._buffer[0:0] = leftover  # type: ignore[attr-defined]
        if too_big:
            return None, f"552 5.3.4 Message size exceeds fixed maximum message size ({limit} octets)"
        stuffed = bytes(buf[: end + 2])  # leading CRLF + lines, each with its CRLF
        body = stuffed.replace(b"\r\n.", b"\r\n")[2:]
        if limit and len(body) > limit:
            return None, f"552 5.3.4 Message size exceeds fixed maximum message size ({limit} octets)"
        if len(body) > TEXT_LINE_LIMIT and max(map(len, body.split(b"\r\n"))) > TEXT_LINE_LIMIT:
            return None, (f"500 5.5.2 Line too long: RFC 5321 limits text lines to 1000 octets "
                          "including CRLF")
        return body, ""
