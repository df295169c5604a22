"""STARTTLS (RFC 3207) for the SMTP front end, mixed into ``RelaySMTP``.

``loop.start_tls`` does the handshake, so uvloop does the TLS when it runs the loop. Anything the
client sent after STARTTLS in clear text is discarded (the command injection known from
CVE-2011-0411), and the session starts over as RFC 3207 4.2 says.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import TYPE_CHECKING

from ..tls import peer_subject

if TYPE_CHECKING:  # pragma: no cover
    from .protocol import RelaySMTP

log = logging.getLogger("mailrelay.smtp")

ALLOWED_BEFORE_TLS = {"EHLO", "STARTTLS", "NOOP", "QUIT"}  # RFC 3207 4, with --server-tls-required
TLS_HANDSHAKE_TIMEOUT = 30.0
TLS_SHUTDOWN_TIMEOUT = 2.0  # a client that never answers our close_notify must not hold up a shutdown


class SmtpTls:
    @property
    def _starttls_offered(self: RelaySMTP) -> bool:  # type: ignore[misc]
        tls = self.server.tls
        return tls is not None and tls.starttls and not (self.relay_session and self.relay_session.tls)

    def _needs_tls_first(self: RelaySMTP, command: str) -> bool:
        # --server-tls-required, loopback clients included: RFC 3207 4's short list before TLS.
        tls = self.server.tls
        return (tls is not None and tls.settings.required and command not in ALLOWED_BEFORE_TLS
                and not (self.relay_session and self.relay_session.tls))

    async def smtp_STARTTLS(self: RelaySMTP, arg: str | None) -> None:
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

    async def _start_tls(self: RelaySMTP) -> None:
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

    def _tls_established(self: RelaySMTP, transport: asyncio.BaseTransport, ssl_object: ssl.SSLObject) -> None:
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
