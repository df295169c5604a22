"""Server-side TLS: the ``SSLContext`` every incoming handshake uses, built from ``[tls]``.

The SMTP front end asks :attr:`ServerTls.context` at the moment of each handshake (STARTTLS, or
the first byte on an implicit-TLS port), so :meth:`ServerTls.reload` (SIGHUP) only has to build a
new context and swap the reference: sessions already in TLS keep the old one, new ones get the
new certificate, and a reload that fails (a half-copied file, a key that does not match) changes
nothing. Files are read in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .config.settings import TlsSettings

log = logging.getLogger("mailrelay.tls")

#: E-MailRelay's ``--tls-config`` version keywords (``tlsv1.2`` is a minimum, ``-tlsv1.2`` a maximum).
TLS_VERSIONS: dict[str, ssl.TLSVersion] = {
    "tlsv1.0": ssl.TLSVersion.TLSv1, "tlsv1.1": ssl.TLSVersion.TLSv1_1,
    "tlsv1.2": ssl.TLSVersion.TLSv1_2, "tlsv1.3": ssl.TLSVersion.TLSv1_3,
}
#: ``--tls-config`` keywords accepted for compatibility that change nothing here.
TLS_CONFIG_IGNORED = {"openssl"}
DEFAULT_CA = "<default>"  # --server-tls-verify <default>: the system's trusted CAs


class TlsError(ValueError):
    """A certificate, key or CA list that cannot be used; the message names the file."""


def parse_tls_config(keywords: list[str]) -> dict[str, str]:
    """E-MailRelay's ``--tls-config`` keywords to ``{"min_version": ..., "max_version": ...}``."""
    result: dict[str, str] = {}
    for keyword in keywords:
        word = keyword.strip().lower()
        if word in TLS_CONFIG_IGNORED:
            continue
        if word in TLS_VERSIONS:
            result["min_version"] = word
        elif word.startswith("-") and word[1:] in TLS_VERSIONS:
            result["max_version"] = word[1:]
        else:
            known = ", ".join([*TLS_VERSIONS, *(f"-{v}" for v in TLS_VERSIONS), *sorted(TLS_CONFIG_IGNORED)])
            raise ValueError(f"unknown keyword {keyword!r} (known: {known})")
    return result


def build_server_context(settings: TlsSettings) -> ssl.SSLContext:
    """A server context from the settings' files; :class:`TlsError` names what is wrong."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # defaults: no compression, server cipher order
    context.minimum_version = TLS_VERSIONS[settings.min_version]
    if context.minimum_version < ssl.TLSVersion.TLSv1_2:
        # Asked for explicitly: TLS 1.0 and 1.1 clients have only ciphers (SHA-1) that the
        # default security level refuses.
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    if settings.max_version:
        context.maximum_version = TLS_VERSIONS[settings.max_version]
    certificate, key = settings.certificate, settings.key or None
    for path in filter(None, (certificate, key)):
        _check_readable(path, "TLS certificate" if path == certificate else "TLS private key")
    try:
        context.load_cert_chain(certificate, key)
    except ssl.SSLError as e:
        files = f"{key} and {certificate}" if key else certificate
        raise TlsError(f"{files}: not a PEM private key and certificate chain that belong together "
                       f"({e.reason or e})") from None
    if settings.verify:
        # E-MailRelay's --server-tls-verify: a client without a certificate from these CAs fails
        # the handshake.
        try:
            if settings.verify == DEFAULT_CA:
                context.load_default_certs(ssl.Purpose.CLIENT_AUTH)
            elif os.path.isdir(settings.verify):
                context.load_verify_locations(capath=settings.verify)
            else:
                _check_readable(settings.verify, "TLS CA list")
                context.load_verify_locations(cafile=settings.verify)
        except ssl.SSLError as e:
            raise TlsError(f"{settings.verify}: not a PEM CA certificate list ({e.reason or e})") from None
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        # Python cannot ask for a certificate and accept one it cannot verify (E-MailRelay logs
        # it); so without a CA list no certificate is asked for.
        context.verify_mode = ssl.CERT_NONE
    return context


def _check_readable(path: str, what: str) -> None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise TlsError(f"cannot read {what} {path}: {e.strerror or e}") from None


class ServerTls:
    """The current server context and the settings it was built from."""

    def __init__(self, settings: TlsSettings, context: ssl.SSLContext):
        self.settings = settings
        self.context = context

    @classmethod
    async def load(cls, settings: TlsSettings) -> "ServerTls":
        """Build the context in a worker thread; raises :class:`TlsError`."""
        context = await asyncio.to_thread(build_server_context, settings)
        log.info("TLS certificate %s loaded (%s%s%s)", settings.certificate, settings.min_version,
                 f" to {settings.max_version}" if settings.max_version else " or later",
                 f"; client certificates verified against {settings.verify}" if settings.verify else "")
        return cls(settings, context)

    @property
    def starttls(self) -> bool:
        """STARTTLS is offered (``--server-tls``)."""
        return self.settings.starttls

    @property
    def implicit(self) -> bool:
        """Every connection starts with a handshake (``--server-tls-connection``)."""
        return self.settings.connection

    def listener_context(self) -> ssl.SSLContext:
        """The context for an implicit-TLS listener. The event loop keeps that object for the
        listener's lifetime, so it hands each handshake to the current context: OpenSSL calls
        the server-name callback for every ClientHello, with or without SNI."""
        def use_current(ssl_object: ssl.SSLObject, server_name: str | None,
                        context: ssl.SSLContext) -> None:
            if self.context is not context:
                ssl_object.context = self.context

        listener = self.context
        listener.sni_callback = use_current  # type: ignore[assignment]
        return listener

    async def reload(self) -> None:
        """Re-read the certificate, key and CA list; keep the old context if they are unusable."""
        self.context = await asyncio.to_thread(build_server_context, self.settings)
        log.info("TLS certificate %s reloaded; new connections use it", self.settings.certificate)


def peer_subject(peercert: dict[str, Any] | None) -> str:
    """A verified peer certificate's subject in OpenSSL's one-line form (``/CN=x/O=y``)."""
    if not peercert:
        return ""
    parts = [f"/{_SHORT_NAMES.get(name, name)}={value}"
             for rdn in peercert.get("subject", ()) for name, value in rdn]
    return "".join(parts)


_SHORT_NAMES = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
                "countryName": "C", "localityName": "L", "stateOrProvinceName": "ST"}
