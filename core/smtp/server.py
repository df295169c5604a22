"""The SMTP listener: serves bound sockets, tracks sessions, and shuts down gracefully.

With ``[tls]`` on, the server holds the TLS context (:class:`~mailrelay.tls.ServerTls`) that each
session's handshake uses; :meth:`SmtpServer.reload_tls` (SIGHUP) swaps in a fresh one.

On shutdown no new connection is accepted; idle sessions get ``421`` at once; a session in the
middle of a command (DATA being committed, say) finishes it, gets its reply, then ``421``. What is
still open after the grace period is dropped: nothing it sent was acknowledged, so nothing is lost.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING, Callable

from ..net import LISTEN_BACKLOG
from ..tls import ServerTls
from .protocol import TLS_HANDSHAKE_TIMEOUT, TLS_SHUTDOWN_TIMEOUT, RelaySMTP

if TYPE_CHECKING:  # pragma: no cover
    from ..config.settings import SmtpSettings, TlsSettings
    from .reception import Reception

log = logging.getLogger("mailrelay.smtp")


class SmtpServer:
    def __init__(self, reception: Reception, settings: SmtpSettings, hostname: str,
                 sockets: list[socket.socket], on_disconnect: Callable[[int], None] | None = None,
                 tls_settings: TlsSettings | None = None):
        self.reception = reception
        self.settings = settings
        self.tls_settings = tls_settings or reception.relay.settings.tls
        self.tls: ServerTls | None = None
        self.hostname = hostname
        self.sockets = sockets
        self.on_disconnect = on_disconnect
        self.sessions: set[RelaySMTP] = set()
        self._servers: list[asyncio.base_events.Server] = []
        self._idle = asyncio.Event()
        self._idle.set()

    def _protocol(self) -> RelaySMTP:
        return RelaySMTP(self.reception, self.settings, self, hostname=self.hostname)

    async def start(self) -> None:
        """Load the TLS certificate (a :class:`~mailrelay.tls.TlsError` if unusable), then serve."""
        if self.tls_settings.enabled:
            self.tls = await ServerTls.load(self.tls_settings)
        loop = asyncio.get_running_loop()
        # --server-tls-connection: the loop does the handshake before the session starts.
        implicit = self.tls.listener_context() if self.tls is not None and self.tls.implicit else None
        for sock in self.sockets:
            self._servers.append(await loop.create_server(
                self._protocol, sock=sock, backlog=LISTEN_BACKLOG, ssl=implicit,
                ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT if implicit else None,
                ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT if implicit else None))

    async def reload_tls(self) -> bool:
        """Re-read the TLS certificate for new connections; False (and an error logged) if the
        files are unusable, in which case the current certificate stays."""
        if self.tls is None:
            return False
        try:
            await self.tls.reload()
        except (ValueError, OSError) as e:  # TlsError, or a file that vanished while being read
            log.error("TLS certificate not reloaded, the current one stays in use: %s", e)
            return False
        return True

    def session_started(self, protocol: RelaySMTP) -> None:
        self.sessions.add(protocol)
        self._idle.clear()

    def session_ended(self, protocol: RelaySMTP) -> None:
        self.sessions.discard(protocol)
        if self.on_disconnect is not None:
            self.on_disconnect(protocol.messages_accepted)
        if not self.sessions:
            self._idle.set()

    async def stop(self, grace: float) -> None:
        for server in self._servers:
            server.close()
        goodbyes = [t for t in (p.begin_shutdown() for p in list(self.sessions)) if t is not None]
        try:
            await asyncio.wait_for(self._idle.wait(), grace)
        except asyncio.TimeoutError:
            log.warning("%d SMTP session(s) still busy after %gs; closing them", len(self.sessions), grace)
            for protocol in list(self.sessions):
                if protocol.transport is not None:
                    protocol.transport.abort()
        await asyncio.gather(*goodbyes, return_exceptions=True)
        self._servers.clear()
