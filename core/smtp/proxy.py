"""The PROXY protocol (v1 and v2, read by aiosmtpd), mixed into ``RelaySMTP``: a header from a
trusted proxy names the real client, and the session takes its address before limits and
``on_connect`` see it."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from aiosmtpd.proxy_protocol import AF, V2_CMD, ProxyData

if TYPE_CHECKING:  # pragma: no cover
    from .protocol import RelaySMTP

log = logging.getLogger("mailrelay.smtp")

PROXY_HEADER_TIMEOUT = 10.0  # the proxy sends its header at once
UNTRUSTED_PROXY = "421 4.7.0 Connections are accepted only through a trusted proxy"


class ProxyHeader:
    async def _proxy_header(self: RelaySMTP, server: Any, session: Any, envelope: Any, proxy: ProxyData) -> bool:
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
