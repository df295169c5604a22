"""The SMTP listener: serves bound sockets, tracks sessions, and shuts down gracefully.

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
from .protocol import RelaySMTP

if TYPE_CHECKING:  # pragma: no cover
    from ..config.settings import SmtpSettings
    from .reception import Reception

log = logging.getLogger("mailrelay.smtp")


class SmtpServer:
    def __init__(self, reception: Reception, settings: SmtpSettings, hostname: str,
                 sockets: list[socket.socket], on_disconnect: Callable[[int], None] | None = None):
        self.reception = reception
        self.settings = settings
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
        loop = asyncio.get_running_loop()
        for sock in self.sockets:
            self._servers.append(await loop.create_server(self._protocol, sock=sock, backlog=LISTEN_BACKLOG))

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
