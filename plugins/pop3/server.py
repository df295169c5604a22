"""The POP3 listener: sockets, sessions, TLS, and which mailbox a user gets.

``relay_listeners`` hands the relay one :class:`Pop3Server`; the relay calls :meth:`start` after
``relay_startup`` and :meth:`stop` on shutdown. Addresses come from ``--interface`` (its
``pop=ADDR`` items and the bare ones), the port from ``--pop-port``, and a second, implicit-TLS
listener (POP3S) from ``[pop3] tls_port``. As with E-MailRelay, clients that are not on
loopback are served only with ``--remote-clients``.

TLS uses the relay's server certificate (``[tls]``, ``--server-tls-certificate``): STLS is
offered whenever one is configured. Each handshake takes the SMTP server's current context
when there is one, so ``kill -HUP`` renews the certificate for POP3 too.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import ipaddress
import itertools
import logging
import os
import socket
import ssl
from pathlib import Path
from typing import Any

from mailrelay import net
from mailrelay.tls import ServerTls

from mailrelay_plugins.filters.mailbox import mailbox_problem

from .login import Authenticator
from .mailbox import Mailbox, SizeCache
from .maildir import Maildir, is_maildir
from .protocol import MAX_LINE, TLS_HANDSHAKE_TIMEOUT, TLS_SHUTDOWN_TIMEOUT, Pop3Session
from .settings import Pop3Settings
from .spooldir import SpoolDirectory

log = logging.getLogger("mailrelay.pop3")

DIR_MODE = 0o770
TOO_MANY = "-ERR [SYS/TEMP] Too many connections, try again later"
NOT_REMOTE = "-ERR [SYS/PERM] This server does not serve remote clients"


class Pop3Server:
    """The POP3 server of one relay."""

    def __init__(self, relay: Any, settings: Pop3Settings, auth: Authenticator, mailbox_root: Path,
                 tls: ServerTls | None):
        self.relay = relay
        self.settings = settings
        self.auth = auth
        self.mailbox_root = mailbox_root      # by_name: <root>/<user>; else the spool itself
        self.spool_dir = Path(relay.spool.directory).resolve()
        self.durable = bool(relay.spool.durable)
        self.domain: str = relay.domain
        self.tls = tls
        self.tls_required = bool(relay.settings.tls.required)
        self.allow_remote = bool(relay.settings.smtp.remote_clients)
        self.anonymous = "server" in relay.settings.smtp.anonymous
        self.sizes = SizeCache()
        self.files = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="pop3-files")
        self.sessions: dict[Pop3Session, asyncio.Task[Any]] = {}
        self.sockets: list[tuple[socket.socket, bool]] = []   # (socket, implicit TLS)
        self._servers: list[asyncio.base_events.Server] = []
        self._ids = itertools.count(1)

    # ---------------------------------------------------------------- life cycle
    def bind(self) -> None:
        """Bind the listening sockets; :class:`mailrelay.net.BindError` names the address."""
        smtp = self.relay.settings.smtp
        # Sockets a service manager passed as "pop" replace the default address (socket activation).
        claim = getattr(self.relay, "inherited_sockets", None)
        inherited: list[socket.socket] = claim("pop") if claim is not None else []
        self.sockets += [(sock, False) for sock in inherited]
        addresses = [] if inherited and not smtp.interface else \
            net.addresses_for("pop", smtp.interface, any_default=smtp.remote_clients)
        ports = [(self.settings.port, False)] + ([(self.settings.tls_port, True)] if self.settings.tls_port else [])
        unix_mode = int(getattr(self.relay.settings.server, "unix_socket_mode", "660"), 8)
        try:
            for port, implicit in ports:
                for address in addresses:
                    if implicit and address.startswith("/"):
                        continue  # a Unix socket path names one listener: the plain one
                    try:
                        self.sockets.append((net.bind(address, port, unix_mode=unix_mode), implicit))
                    except net.BindError as e:
                        if not smtp.interface and address == "::" and e.errno in (errno.EAFNOSUPPORT,
                                                                                errno.EADDRNOTAVAIL):
                            continue  # the implicit "::" of the any-address default on an IPv4-only host
                        raise
        except BaseException:
            self._close_sockets()
            raise

    async def start(self) -> None:
        self.bind()
        for sock, implicit in self.sockets:
            context = self._listener_context() if implicit else None
            self._servers.append(await asyncio.start_server(
                self._accept, sock=sock, limit=MAX_LINE, ssl=context,
                ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT if context else None,
                ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT if context else None))
        log.info("pop3 listening on %s mailboxes=%s%s%s", ", ".join(self.addresses),
                 f"{self.mailbox_root}/<user>" if self.settings.by_name else f"{self.spool_dir} (the spool)",
                 " stls" if self.tls_available else "", " no-delete" if self.settings.no_delete else "")

    async def stop(self) -> None:
        """No new connections; sessions not in the middle of QUIT are closed at once (nothing
        they did is committed); a QUIT being committed gets ``shutdown_grace`` to finish."""
        for server in self._servers:
            server.close()
        for session, task in list(self.sessions.items()):
            if not session.committing:
                task.cancel()
        tasks = list(self.sessions.values())
        if tasks:
            done, pending = await asyncio.wait(tasks, timeout=self.settings.shutdown_grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        self._servers.clear()
        self._close_sockets()
        await asyncio.to_thread(self.files.shutdown, wait=True)
        self.auth.close()

    def _close_sockets(self) -> None:
        remove_file = getattr(net, "remove_socket_file", None)
        for sock, _ in self.sockets:
            sock.close()
            if remove_file is not None:
                remove_file(sock)  # a Unix socket this process made
        self.sockets.clear()

    @property
    def addresses(self) -> list[str]:
        return [net.describe(s) + (" (tls)" if implicit else "") for s, implicit in self.sockets]

    @property
    def port(self) -> int:
        """The bound POP3 port (useful when configured as 0)."""
        return next((s.getsockname()[1] for s, implicit in self.sockets
                     if not implicit and s.family in (socket.AF_INET, socket.AF_INET6)), 0)

    # ---------------------------------------------------------------- sessions
    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = Pop3Session(self, reader, writer)
        task = asyncio.current_task()
        assert task is not None
        self.sessions[session] = task
        try:
            await session.run()
        except asyncio.CancelledError:
            pass  # shutdown: the session said goodbye if it could
        except Exception:  # a bug: this session ends, the server carries on
            log.exception("session=%s client=%s pop3 session failed", session.id, session.peer_ip)
            writer.transport.abort()
        finally:
            self.sessions.pop(session, None)

    def next_session_id(self) -> str:
        return f"p{next(self._ids)}"

    def refusal(self, session: Pop3Session) -> str:
        """Why a new session is refused before the greeting, or ``""``."""
        if not self.allow_remote and not self.is_loopback(session.peer_ip):
            return NOT_REMOTE
        limit = self.settings.max_connections
        if limit and len(self.sessions) > limit:
            return TOO_MANY
        return ""

    @staticmethod
    def is_loopback(peer_ip: str) -> bool:
        try:
            address = ipaddress.ip_address(peer_ip.split("%")[0])
        except ValueError:  # a Unix socket: a local process
            return True
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return address.is_loopback

    def emit(self, name: str, **data: Any) -> None:
        self.relay.emit(name, **data)

    # ---------------------------------------------------------------- TLS
    @property
    def tls_available(self) -> bool:
        return self.tls is not None

    def _current_tls(self) -> ServerTls | None:
        smtp = getattr(self.relay, "smtp", None)
        shared = getattr(smtp, "tls", None)
        return shared if shared is not None else self.tls

    def tls_context(self) -> ssl.SSLContext | None:
        """The context for the next handshake (the newest certificate)."""
        current = self._current_tls()
        return current.context if current is not None else None

    def _listener_context(self) -> ssl.SSLContext:
        """An implicit-TLS listener keeps one context object; each handshake switches to the
        newest one (OpenSSL calls the server-name callback for every ClientHello)."""
        if self.tls is None:
            raise ValueError("[pop3] tls_port needs a server certificate (--server-tls-certificate)")
        listener = self.tls.context

        def use_current(ssl_object: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext) -> None:
            newest = self.tls_context()
            if newest is not None and newest is not context:
                ssl_object.context = newest

        listener.sni_callback = use_current
        return listener

    # ---------------------------------------------------------------- mailboxes
    def open_mailbox(self, user: str) -> Mailbox:
        """Lock and list the mailbox ``user`` gets (blocking: a worker thread calls it)."""
        if not self.settings.by_name:
            return SpoolDirectory(self.spool_dir, spool_dir=self.spool_dir, mailbox_root=None,
                                  durable=self.durable, sizes=self.sizes).open()
        problem = mailbox_problem(user)
        if problem is not None:  # never a path out of the mailbox directory
            raise ValueError(f"user name cannot be a mailbox: {problem}")
        directory = self.mailbox_root / user
        if not directory.exists():
            _make_maildir(directory)  # E-MailRelay creates it too; deliver: and copy: fill it from now on
        if is_maildir(directory):
            return Maildir(directory, durable=self.durable, sizes=self.sizes).open()
        return SpoolDirectory(directory, spool_dir=self.spool_dir, mailbox_root=self.mailbox_root,
                              durable=self.durable, sizes=self.sizes).open()


def _make_maildir(directory: Path) -> None:
    for path in (directory, directory / "tmp", directory / "new", directory / "cur"):
        try:
            os.mkdir(path, DIR_MODE)
        except FileExistsError:
            pass
