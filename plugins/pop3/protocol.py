"""One POP3 session (RFC 1939) with CAPA (RFC 2449), AUTH PLAIN (RFC 5034) and STLS (RFC 2595).

The session reads one command line at a time from an asyncio stream, so pipelined commands
(RFC 2449 PIPELINING) are simply answered in order. States: AUTHORIZATION (USER/PASS, APOP,
AUTH, STLS, CAPA, QUIT), then, with the mailbox locked, TRANSACTION (:mod:`.transaction`); QUIT
there is the UPDATE state. A command outside its state gets ``-ERR``. A session that ends without
QUIT (dropped, timed out, shut down) changes nothing in the mailbox.

Passwords cross the wire only under TLS, from loopback (unless ``loopback_is_secure = false``)
or where the operator allows plaintext; elsewhere CAPA leaves USER and SASL out and they are
refused until STLS. ``[tls] required`` (``--server-tls-required``) refuses every login before
TLS, from loopback too.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import logging
import os
import secrets
import ssl
import time
from typing import TYPE_CHECKING, Any, Callable, Literal

from .login import Attempt, Result
from .mailbox import Mailbox, MailboxInUse
from .transaction import Transaction

if TYPE_CHECKING:  # pragma: no cover
    from .server import Pop3Server

log = logging.getLogger("mailrelay.pop3")

State = Literal["AUTHORIZATION", "TRANSACTION"]
COMMANDS: dict[State, frozenset[str]] = {
    "AUTHORIZATION": frozenset({"USER", "PASS", "APOP", "AUTH", "CAPA", "STLS", "QUIT"}),
    "TRANSACTION": frozenset({"STAT", "LIST", "RETR", "DELE", "NOOP", "RSET", "QUIT", "TOP", "UIDL", "CAPA"}),
}
KNOWN = COMMANDS["AUTHORIZATION"] | COMMANDS["TRANSACTION"]
MAX_LINE = 8192          # octets; RFC 2449 allows 255 for commands, more for SASL responses
MAX_ERRORS = 20          # unknown or malformed commands before the connection is closed
TLS_HANDSHAKE_TIMEOUT = 30.0
TLS_SHUTDOWN_TIMEOUT = 2.0
PLAINTEXT_REFUSED = "-ERR [AUTH] Plaintext login refused on this connection: use STLS first"


class Closed(Exception):
    """The session is over (EOF, time-out, fatal error): stop reading."""


class Pop3Session(Transaction):
    def __init__(self, server: Pop3Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.server = server
        self.reader, self.writer = reader, writer
        peer = writer.get_extra_info("peername") or ("", 0)
        self.peer_ip = str(peer[0]) if isinstance(peer, tuple) else "local"
        self.id = server.next_session_id()
        self.state: State = "AUTHORIZATION"
        self.tls = writer.get_extra_info("ssl_object") is not None
        self.user = ""
        self.pending_user = ""          # USER given, PASS awaited
        self.mailbox: Mailbox | None = None
        self.timestamp = ""             # the APOP challenge in the greeting
        self.retrieved = 0
        self.errors = 0
        self.committing = False
        self.reading = False            # waiting for a command (a goodbye would interrupt nothing)
        self._inflight: concurrent.futures.Future[Any] | None = None

    # ---------------------------------------------------------------- plumbing
    def log(self, level: str, text: str) -> None:
        getattr(log, level)("session=%s client=%s %s", self.id, self.peer_ip, text)

    async def send(self, data: bytes, flush: bool = True) -> None:
        self.writer.write(data)
        if flush or self.writer.transport.get_write_buffer_size() > 256 * 1024:
            try:
                await asyncio.wait_for(self.writer.drain(), self.server.settings.idle_timeout)
            except (asyncio.TimeoutError, ConnectionError) as e:
                raise Closed(f"client not reading: {type(e).__name__}") from None

    async def reply(self, line: str) -> None:
        await self.send(line.encode("utf-8") + b"\r\n")

    async def blocking(self, fn: Callable[..., Any], *args: Any,
                       on_abandon: Callable[[Any], None] | None = None) -> Any:
        """Run file work in the server's worker threads. If this session is cancelled meanwhile
        the work still finishes: ``on_abandon`` then gets its result (to release what it took),
        and :meth:`after_blocking` lets clean-up wait for it."""
        future = self.server.files.submit(fn, *args)
        self._inflight = future
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            if on_abandon is not None:
                def abandoned(done: concurrent.futures.Future[Any]) -> None:
                    if not done.cancelled() and done.exception() is None:
                        on_abandon(done.result())
                future.add_done_callback(abandoned)
            raise

    def after_blocking(self, cleanup: Callable[[], None]) -> None:
        """Run ``cleanup`` once no worker thread is using this session's files any more."""
        future = self._inflight
        if future is not None and not future.done():
            future.add_done_callback(lambda _: cleanup())
        else:
            cleanup()

    def abort(self) -> None:
        self.writer.transport.abort()

    @property
    def secure(self) -> bool:
        """Whether a password may be sent now."""
        if self.tls:
            return True
        if self.server.tls_required:
            return False
        settings = self.server.settings
        return settings.allow_plaintext or (settings.loopback_is_secure and self.server.is_loopback(self.peer_ip))

    # ---------------------------------------------------------------- the session
    async def run(self) -> None:
        """Greet, serve commands until QUIT or the end, then release everything."""
        try:
            refusal = self.server.refusal(self)
            if refusal:
                self.log("info", f"refused: {refusal}")
                await self.reply(refusal)
                return
            self.log("info", f"pop3 connected{' tls' if self.tls else ''}")
            if self.server.auth.apop_available:
                self.timestamp = f"<{os.getpid()}.{secrets.token_hex(8)}.{int(time.time())}@{self.server.domain}>"
            await self.reply(f"+OK {self.server.domain} POP3 server ready" +
                             (f" {self.timestamp}" if self.timestamp else ""))
            while await self._serve_one():
                pass
        except Closed as e:
            self.log("info", f"closed: {e}")
        except (ConnectionError, ssl.SSLError) as e:
            self.log("info", f"connection lost: {e}")
        except asyncio.CancelledError:  # the server is stopping
            if self.reading:  # between commands: nothing else is being sent
                self.writer.write(b"-ERR [SYS/TEMP] Server shutting down\r\n")
            self.log("info", "closed: server shutting down")
            raise
        finally:
            if self.mailbox is not None:
                self.after_blocking(self.mailbox.close)
                self.mailbox = None
            self.writer.close()

    async def read_line(self) -> str:
        self.reading = True  # stays set if cancelled here: a goodbye then interrupts nothing
        try:
            raw = await asyncio.wait_for(self.reader.readuntil(b"\n"), self.server.settings.idle_timeout)
        except asyncio.TimeoutError:
            self.reading = False
            await self.reply("-ERR Idle timeout, closing the connection")
            raise Closed("idle timeout") from None
        except asyncio.IncompleteReadError:
            raise Closed("client disconnected") from None
        except asyncio.LimitOverrunError:
            self.reading = False
            await self.reply("-ERR Line too long")
            raise Closed("line too long") from None
        self.reading = False
        line = raw.rstrip(b"\r\n")
        if b"\0" in line:
            await self.reply("-ERR NUL in command")
            raise Closed("NUL in command")
        try:
            return line.decode("utf-8")
        except UnicodeDecodeError:
            return line.decode("latin-1")

    async def _serve_one(self) -> bool:
        """Read and answer one command; False once the session is over."""
        line = await self.read_line()
        keyword, _, arg = line.partition(" ")
        keyword = keyword.upper()
        if keyword not in KNOWN:
            return await self._error("-ERR Unknown command")
        if keyword not in COMMANDS[self.state]:
            return await self._error(f"-ERR {keyword} is not valid in the {self.state} state")
        if keyword == "QUIT":
            if self.state == "TRANSACTION":
                await self.update()
            else:
                await self.reply("+OK Bye")
            return False
        if keyword not in ("USER", "PASS"):
            self.pending_user = ""  # PASS must follow its USER
        if keyword != "PASS":  # a password may begin or end with spaces; nothing else does
            arg = arg.strip()
        handler = getattr(self, f"cmd_{keyword}")
        return await handler(arg) is not False

    async def _error(self, text: str) -> bool:
        self.errors += 1
        await self.reply(text)
        if self.errors >= MAX_ERRORS:
            await self.reply("-ERR Too many errors, closing the connection")
            return False
        return True

    # ---------------------------------------------------------------- AUTHORIZATION
    async def cmd_CAPA(self, arg: str) -> None:
        capabilities = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if self.state == "AUTHORIZATION":
            if self.secure:
                capabilities += ["USER", "SASL PLAIN"]
            if self.server.tls_available and not self.tls:
                capabilities.append("STLS")
        if self.server.settings.no_delete:
            capabilities.append("EXPIRE NEVER")
        if not self.server.anonymous:
            capabilities.append("IMPLEMENTATION mailrelay")
        await self.send(("\r\n".join(["+OK Capability list follows", *capabilities, "."]) + "\r\n").encode())

    async def cmd_STLS(self, arg: str) -> bool:
        if arg:
            await self.reply("-ERR Syntax: STLS")
            return True
        if self.tls:
            await self.reply("-ERR Already using TLS")
            return True
        context = self.server.tls_context()
        if context is None:
            await self.reply("-ERR STLS not available")
            return True
        # No drain between the reply and start_tls(): it stops reading from the socket before the
        # loop runs again, so the client's handshake cannot land in the command buffer.
        self.writer.write(b"+OK Begin TLS negotiation\r\n")
        return await self._start_tls(context)

    async def _start_tls(self, context: ssl.SSLContext) -> bool:
        # Clear text sent after STLS is discarded (the injection known from CVE-2011-0411).
        self.reader._buffer.clear()  # type: ignore[attr-defined]
        plain = self.writer.transport
        protocol = plain.get_protocol()
        loop = asyncio.get_running_loop()
        try:
            transport = await loop.start_tls(plain, protocol, context, server_side=True,
                                             ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT,
                                             ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT)
        except (OSError, EOFError, asyncio.TimeoutError) as e:  # ssl.SSLError is an OSError
            self.log("info", f"TLS handshake failed: {e}")
            plain.abort()
            return False
        if transport is None or transport.get_extra_info("ssl_object") is None:
            plain.abort()
            return False
        # The streams read from and write to the TLS transport from now on.
        self.writer._transport = transport  # type: ignore[attr-defined]
        self.reader._transport = transport  # type: ignore[attr-defined]
        protocol._replace_writer(self.writer)  # type: ignore[attr-defined]
        self.tls, self.pending_user = True, ""
        ssl_object = transport.get_extra_info("ssl_object")
        self.log("info", f"TLS {ssl_object.version()} cipher={(ssl_object.cipher() or ('',))[0]}")
        return True

    async def cmd_USER(self, arg: str) -> None:
        if not arg:
            return await self.reply("-ERR Syntax: USER name")
        if not self.secure:
            return await self.reply(PLAINTEXT_REFUSED)
        self.pending_user = arg
        await self.reply("+OK Send PASS")  # the same for every name: it says nothing about the user

    async def cmd_PASS(self, arg: str) -> bool:
        user, self.pending_user = self.pending_user, ""
        if not user:
            await self.reply("-ERR USER first")
            return True
        if not self.secure:
            await self.reply(PLAINTEXT_REFUSED)
            return True
        result = await self.server.auth.password(Attempt(self.id, self.peer_ip, user, "USER"), arg)
        return await self._logged_in(user, result, "USER")

    async def cmd_APOP(self, arg: str) -> bool:
        name, _, digest = arg.rpartition(" ")
        if not self.timestamp:
            await self.reply("-ERR APOP not available")
            return True
        if self.server.tls_required and not self.tls:
            await self.reply(PLAINTEXT_REFUSED)
            return True
        if not name or len(digest) != 32:
            await self.reply("-ERR Syntax: APOP name digest")
            return True
        result = await self.server.auth.apop(Attempt(self.id, self.peer_ip, name, "APOP"), self.timestamp, digest)
        return await self._logged_in(name, result, "APOP")

    async def cmd_AUTH(self, arg: str) -> bool:
        mechanism, _, initial = arg.strip().partition(" ")
        offered = ["PLAIN"] if self.secure else []
        if not mechanism:  # the RFC 1734 form: list the mechanisms
            await self.send(("\r\n".join(["+OK", *offered, "."]) + "\r\n").encode())
            return True
        if mechanism.upper() != "PLAIN":
            await self.reply("-ERR Unsupported authentication mechanism")
            return True
        if not offered:
            await self.reply(PLAINTEXT_REFUSED)
            return True
        if not initial:
            await self.reply("+ ")
            initial = await self.read_line()
            if initial == "*":
                await self.reply("-ERR Authentication cancelled")
                return True
        try:
            decoded = b"" if initial == "=" else base64.b64decode(initial.strip(), validate=True)
            authzid, user, password = decoded.decode("utf-8").split("\0")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            await self.reply("-ERR Malformed PLAIN response")
            return True
        if authzid and authzid != user:
            await self.reply("-ERR [AUTH] Authentication failed")  # no proxy logins
            return True
        result = await self.server.auth.password(Attempt(self.id, self.peer_ip, user, "PLAIN"), password)
        return await self._logged_in(user, result, "PLAIN")

    async def _logged_in(self, user: str, result: Result, mechanism: str) -> bool:
        """Answer a login attempt; on success lock and list the mailbox."""
        if result is Result.LOCKED:
            await self.reply("-ERR [SYS/TEMP] Too many failed logins, try again later")
            return False
        if result is Result.TEMPORARY:
            await self.reply("-ERR [SYS/TEMP] Temporary authentication failure, try again later")
            return True
        if result is Result.FAILED:
            await self.reply("-ERR [AUTH] Authentication failed")
            return True
        try:
            mailbox = await self.blocking(self.server.open_mailbox, user, on_abandon=lambda m: m.close())
        except MailboxInUse:
            self.log("info", f"user={user!r} mailbox in use by another session")
            await self.reply("-ERR [IN-USE] Mailbox in use by another session, try again later")
            return True
        except (OSError, ValueError) as e:
            self.log("error", f"user={user!r} mailbox cannot be opened: {e}")
            await self.reply("-ERR [SYS/TEMP] Mailbox unavailable, try again later")
            return True
        self.mailbox, self.user, self.state = mailbox, user, "TRANSACTION"
        count, octets = len(mailbox.messages), sum(m.size for m in mailbox.messages)
        self.log("info", f"logged in user={user!r} mechanism={mechanism} messages={count} octets={octets} mailbox={mailbox.directory}")
        self.server.emit("pop3.login", session=self.id, client=self.peer_ip, user=user, messages=count)
        await self.reply(f"+OK {count} messages ({octets} octets)")
        return True
