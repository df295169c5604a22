"""SMTP AUTH towards the next hop (``--client-auth``), with E-MailRelay's ``--client-auth-config``.

``--client-auth-config`` is ``;``-separated items ``KEY:NAME,NAME``: ``m`` lists the mechanisms to
use in order of preference and ``x`` those to avoid; ``a`` and ``d`` do the same once the
connection is under TLS. Without an ``a`` or ``d`` item, ``m`` and ``x`` apply under TLS too; a
value without any ``KEY:`` is an ``m`` list (``cram-md5,plain``), as E-MailRelay allows. Names
this client cannot do (``cram-sha1``, ``xoauth2``) are accepted and never match.

One mechanism is tried, the first usable one the server offers: a wrong password then costs one
failed attempt at the server, not one per mechanism (which trips lockouts). A password never
crosses a network in clear text, whatever the configuration says (loopback is exempt).
"""

from __future__ import annotations

import base64
import ipaddress
from dataclasses import dataclass

import aiosmtplib

from mailrelay.cram_md5 import cram_md5_response
from mailrelay.secrets import Secret, parse_auth_config

from .hop import Hop, HopError

#: What this client can do, and names E-MailRelay knows that are accepted in the configuration.
MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5")
FOREIGN_MECHANISMS = ("CRAM-SHA1", "CRAM-SHA256", "CRAM-SHA512", "APOP", "XOAUTH2")


@dataclass(frozen=True)
class MechanismPreference:
    """``--client-auth-config`` parsed; ``None`` means "no preference list" (our own order)."""

    prefer: tuple[str, ...] | None = None
    avoid: tuple[str, ...] = ()
    tls_prefer: tuple[str, ...] | None = None
    tls_avoid: tuple[str, ...] = ()

    def candidates(self, usable: tuple[str, ...], secure: bool) -> list[str]:
        """``usable`` mechanisms (our order) reordered and filtered by the lists for ``secure``."""
        prefer, avoid = (self.tls_prefer, self.tls_avoid) if secure else (self.prefer, self.avoid)
        order = usable if prefer is None else prefer
        return [m for m in order if m in usable and m not in avoid]


def parse_client_auth_config(text: str) -> MechanismPreference:
    """Parse ``--client-auth-config`` (case-insensitive); ConfigError naming the bad item."""
    text = text.strip()
    if text and ":" not in text:
        text = "m:" + text
    items = parse_auth_config(text, "--client-auth-config", MECHANISMS, FOREIGN_MECHANISMS)
    prefer, avoid = items.get("M"), items.get("X", ())
    if "A" in items or "D" in items:
        return MechanismPreference(prefer, avoid, items.get("A"), items.get("D", ()))
    return MechanismPreference(prefer, avoid, prefer, avoid)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _reply_text(message: str) -> str:
    return " ".join(message.split())


async def authenticate(client: aiosmtplib.SMTP, hop: Hop, account: Secret, preference: MechanismPreference,
                       timeout: float) -> None:
    """Log in as ``account``; HopError (this hop cannot be used) when that is impossible or refused."""
    encrypted = client.get_transport_info("sslcontext") is not None
    if not encrypted and (hop.proxy is not None or not _is_loopback(hop.host)):
        # A password never crosses the network in clear text (through a proxy it always does).
        raise HopError(f"{hop}: not sending credentials without TLS (the server offered no "
                       "STARTTLS, or tls = \"off\")")
    if not client.supports_extension("auth"):
        raise HopError(f"{hop} does not offer AUTH, but --client-auth is configured")
    offered = [m.upper() for m in client.server_auth_methods]
    usable = ("CRAM-MD5",) if account.kind == "md5" else MECHANISMS  # a hashed secret does CRAM-MD5 only
    allowed = preference.candidates(usable, encrypted)
    mechanism = next((m for m in allowed if m in offered), None)
    if mechanism is None:
        raise HopError(f"{hop} offers no AUTH mechanism this account may use "
                       f"({', '.join(allowed) or 'none, after --client-auth-config'}): "
                       f"{' '.join(offered) or 'none'}")
    try:
        if mechanism == "CRAM-MD5" and account.kind == "md5":
            await _cram_md5(client, account, timeout)
        else:
            method = getattr(client, f"auth_{mechanism.lower().replace('-', '')}")
            await method(account.name, account.secret, timeout=timeout)
    except aiosmtplib.SMTPAuthenticationError as e:
        raise HopError(f"{hop}: authentication failed: {e.code} {_reply_text(e.message)} ({mechanism})") from None


async def _cram_md5(client: aiosmtplib.SMTP, account: Secret, timeout: float) -> None:
    """RFC 2195 with E-MailRelay's hashed secret (aiosmtplib's CRAM-MD5 needs the password)."""
    reply = await client.execute_command(b"AUTH", b"CRAM-MD5", timeout=timeout)
    if reply.code != 334:
        raise aiosmtplib.SMTPAuthenticationError(reply.code, reply.message)
    try:
        challenge = base64.b64decode(reply.message.strip(), validate=True)
    except ValueError:
        raise aiosmtplib.SMTPAuthenticationError(reply.code, "malformed CRAM-MD5 challenge") from None
    reply = await client.execute_command(cram_md5_response(account.name, account, challenge).encode("ascii"),
                                         timeout=timeout)
    if reply.code != 235:
        raise aiosmtplib.SMTPAuthenticationError(reply.code, reply.message)
