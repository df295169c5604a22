"""TLS towards the next hop: E-MailRelay's ``--client-tls...`` options as ``[forward]`` keys.

- ``tls_connection`` (``--client-tls-connection``): TLS from the first byte (SMTPS, port 465)
  instead of STARTTLS;
- ``tls_certificate`` / ``tls_key`` (``--client-tls-certificate``): a client certificate presented
  to every next hop that asks for one;
- ``tls_ca`` (``--client-tls-verify``): the server certificate must chain to these CAs (a PEM file,
  a directory, or ``<default>`` for the system's); as with E-MailRelay the name in it is checked
  only when one is asked for:
- ``tls_verify_name`` (``--client-tls-verify-name``): the certificate must be for this name
  (a DNS or IP subject alternative name, wildcards in the first label, or the subject CN);
- ``tls_verify`` (ours): verify against the system CAs (or ``tls_ca``) *and* for the name
  connected to;
- ``tls_server_name`` (``--client-tls-server-name``): the name sent in the handshake (SNI).

``--tls-config`` (``[tls] min_version``/``max_version``) applies to these connections as it does
to the server, as in E-MailRelay, where one library configuration serves both sides.
Files are read when the contexts are built (at start-up, off the event loop); a file that cannot
be used is a :class:`ConfigError` naming it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import ssl
from dataclasses import dataclass
from typing import Any

from mailrelay.config.loader import ConfigError
from mailrelay.tls import DEFAULT_CA, TLS_VERSIONS

from .hop import Hop, HopError


@dataclass(frozen=True)
class ClientTls:
    """How connections to a next hop at the default level (``[forward] tls``) are secured."""

    connection: bool = False   # implicit TLS (SMTPS)
    certificate: str = ""      # client certificate chain (with the key unless ``key``)
    key: str = ""
    ca: str = ""               # CA file or directory, or "<default>"; set: the chain is verified
    verify_name: str = ""      # the name the certificate must carry
    verify_host: bool = False  # [forward] tls_verify: verify, and for the name connected to
    server_name: str = ""      # SNI
    min_version: str = "tlsv1.2"
    max_version: str = ""

    @property
    def verifies(self) -> bool:
        return bool(self.ca) or self.verify_host

    def name_to_check(self, connected_name: str) -> str:
        """The name the server certificate must be for ("" when only the chain is checked)."""
        return self.verify_name or (connected_name if self.verify_host else "")

    def describe(self) -> str:
        """What the verification trusts, for error messages."""
        return f"--client-tls-verify {self.ca}" if self.ca else "[forward] tls_verify (system CAs)"


def build_context(tls: ClientTls, *, verify: bool, ca: str = "", extra_ca: str = "",
                  check_hostname: bool = False) -> ssl.SSLContext:
    """A client context: versions from ``--tls-config``, the client certificate, and (``verify``)
    the CAs of ``ca`` (``""`` or ``<default>``: the system's) plus ``extra_ca``. Blocking."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    if verify:
        context.verify_mode = ssl.CERT_REQUIRED
        try:
            if not ca or ca == DEFAULT_CA:
                context.load_default_certs(ssl.Purpose.SERVER_AUTH)
            elif os.path.isdir(ca):
                context.load_verify_locations(capath=ca)
            else:
                context.load_verify_locations(cafile=ca)
            if extra_ca:
                context.load_verify_locations(cafile=extra_ca)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"{ca or extra_ca}: cannot load CA certificates: {_reason(e)}") from None
        context.check_hostname = check_hostname
    else:
        context.verify_mode = ssl.CERT_NONE
    context.minimum_version = TLS_VERSIONS[tls.min_version]
    if context.minimum_version < ssl.TLSVersion.TLSv1_2:
        context.set_ciphers("DEFAULT:@SECLEVEL=0")  # asked for: old peers have only SHA-1 suites
    if tls.max_version:
        context.maximum_version = TLS_VERSIONS[tls.max_version]
    if tls.certificate:
        try:
            context.load_cert_chain(tls.certificate, tls.key or None)
        except (OSError, ssl.SSLError) as e:
            files = f"{tls.key} and {tls.certificate}" if tls.key else tls.certificate
            raise ConfigError(f"--client-tls-certificate {files}: not a readable PEM private key and "
                              f"certificate chain that belong together ({_reason(e)})") from None
    return context


def _reason(e: Exception) -> str:
    if isinstance(e, ssl.SSLError):
        return str(e.reason or e)
    return str(getattr(e, "strerror", None) or e)


def name_problem(peercert: dict[str, Any] | None, name: str) -> str:
    """Why a verified certificate (``getpeercert()``) is not for ``name``; "" when it is."""
    if not peercert:
        return "the server sent no certificate"
    dns_names = [v.lower().rstrip(".") for k, v in peercert.get("subjectAltName", ()) if k == "DNS"]
    addresses = [v for k, v in peercert.get("subjectAltName", ()) if k == "IP Address"]
    common_names = [v for rdn in peercert.get("subject", ()) for k, v in rdn if k == "commonName"]
    wanted = name.lower().rstrip(".")
    try:
        address = ipaddress.ip_address(wanted.strip("[]"))
    except ValueError:
        if any(_dns_match(pattern, wanted) for pattern in dns_names):
            return ""
    else:
        if any(_same_address(a, address) for a in addresses):
            return ""
    if any(cn.lower() == wanted for cn in common_names):  # E-MailRelay compares the subject CN
        return ""
    names = [*dns_names, *addresses, *(f"CN={cn}" for cn in common_names)]
    return f"it is for {', '.join(names) or 'no name'}"


def _dns_match(pattern: str, name: str) -> bool:
    if pattern == name:
        return True
    # RFC 6125 6.4.3: a wildcard only as the whole left-most label, matching exactly one label.
    if pattern.startswith("*.") and "." in name:
        first, rest = name.split(".", 1)
        return bool(first) and rest == pattern[2:] and "*" not in rest
    return False


def _same_address(text: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    try:
        return ipaddress.ip_address(text.strip()) == address
    except ValueError:
        return False


async def open_socket(hop: Hop, timeout: float, local_address: str = "") -> socket.socket:
    """A TCP connection to ``hop`` (each address in turn) for implicit TLS: aiosmtplib sends its
    host name as the SNI name, so it is given this socket and the name to send instead."""
    loop = asyncio.get_running_loop()
    error: OSError = OSError(f"{hop.host} has no address")
    try:
        async with asyncio.timeout(timeout):
            for family, kind, proto, _, address in await loop.getaddrinfo(hop.host, hop.port,
                                                                          type=socket.SOCK_STREAM):
                sock = socket.socket(family, kind, proto)
                sock.setblocking(False)
                try:
                    if local_address:
                        sock.bind((local_address, 0))
                    await loop.sock_connect(sock, address)
                    return sock
                except OSError as e:
                    sock.close()
                    error = e
    except TimeoutError:
        raise HopError(f"{hop}: no connection within {timeout:g} s") from None
    except OSError as e:
        error = e
    raise HopError(f"{hop}: cannot connect: {error.strerror or error}")
