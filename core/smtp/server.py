"""The SMTP listener: serves bound sockets, tracks sessions, and shuts down gracefully.

With ``[tls]`` on, the server holds the TLS context (:class:`~mailrelay.tls.ServerTls`) that each
session's handshake uses; :meth:`SmtpServer.reload_tls` (SIGHUP) swaps in a fresh one.

On shutdown no new connection is accepted; idle sessions get ``421`` at once; a session in the
middle of a command (DATA being committed, say) finishes it, gets its reply, then ``421``. What is
still open after the grace period is dropped: nothing it sent was acknowledged, so nothing is lost.

Connection limits live here because the server is what counts sessions: ``[smtp] max_connections``
is checked as a connection is accepted, ``max_connections_per_client`` once the client's address
is known (after any PROXY header), and either answers ``421 4.7.0`` and closes.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import socket
from typing import TYPE_CHECKING, Callable, Union

from ..net import LISTEN_BACKLOG
from ..tls import ServerTls
from .protocol import RelaySMTP
from .starttls import TLS_HANDSHAKE_TIMEOUT, TLS_SHUTDOWN_TIMEOUT

if TYPE_CHECKING:  # pragma: no cover
    from ..config.settings import SmtpSettings, TlsSettings
    from .reception import Reception

log = logging.getLogger("mailrelay.smtp")

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections, try again later"
TOO_MANY_FROM_CLIENT = "421 4.7.0 Too many connections from your address, try again later"


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
        self.connections_total = 0  # accepted since start, refused ones included (metrics)
        self.per_client: collections.Counter[str] = collections.Counter()
        server = reception.relay.settings.server
        self.proxy_protocol = server.proxy_protocol
        self.trusted_proxies: list[Network] = [ipaddress.ip_network(n, strict=False)
                                               for n in server.trusted_proxies]
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

    def session_started(self, protocol: RelaySMTP) -> str | None:
        """Count a new connection; the reply that refuses it when over ``max_connections``."""
        self.sessions.add(protocol)
        self.connections_total += 1
        self._idle.clear()
        limit = self.settings.max_connections
        if limit and len(self.sessions) > limit:
            log.warning("client=%s refused: %d connections, the limit is %d (max_connections)",
                        protocol.relay_session.peer_ip if protocol.relay_session else "-",
                        len(self.sessions) - 1, limit)
            return TOO_MANY_CONNECTIONS
        return None

    def trusts_proxy(self, peer_ip: str) -> bool:
        """Whether a PROXY header from ``peer_ip`` (the TCP peer) is believed."""
        try:
            address = ipaddress.ip_address(peer_ip.split("%")[0])
        except ValueError:  # a Unix socket: only local processes can connect
            return True
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # a dual-stack listener
        return any(address in network for network in self.trusted_proxies)

    def client_identified(self, protocol: RelaySMTP) -> str | None:
        """The client's address is final (after any PROXY header): count it; the reply that
        refuses the session when over ``max_connections_per_client``."""
        assert protocol.relay_session is not None
        address = protocol.relay_session.peer_ip
        protocol.counted_as = address
        self.per_client[address] += 1
        limit = self.settings.max_connections_per_client
        if limit and self.per_client[address] > limit:
            log.warning("session=%s client=%s refused: %d connections from this address, the limit is %d "
                        "(max_connections_per_client)", protocol.relay_session.id, address,
                        self.per_client[address] - 1, limit)
            return TOO_MANY_FROM_CLIENT
        return None

    def session_ended(self, protocol: RelaySMTP) -> None:
        self.sessions.discard(protocol)
        if protocol.counted_as is not None:
            self.per_client[protocol.counted_as] -= 1
            if self.per_client[protocol.counted_as] <= 0:
                del self.per_client[protocol.counted_as]  # the counter stays as small as the sessions
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
