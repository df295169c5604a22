"""``forward``: route remote recipients to a smarthost or by DNS MX, and deliver them over SMTP.

Enabled by ``--forward-to`` / ``--as-client`` / ``--as-proxy`` or ``[plugins] enable = ["forward"]``.

    [forward]
    to = "smtp.example.net:587"   # or "mx", or "host:port@socks-host:port" through a SOCKS proxy
    [routes]
    "example.com" = "mail.example.com:25"
    "*.internal.example" = "10.0.0.5:25"
    "*" = "mx"
    [mta_sts]                     # MX routing: honour recipient domains' MTA-STS policies
    enabled = true
    [dane]                        # MX routing: DANE TLSA records (needs a validating resolver)
    enabled = true
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mailrelay_sdk import DeliveryResult, Message, Recipient, Route, hookimpl

from mailrelay import logs
from mailrelay.config.loader import ConfigError
from mailrelay.secrets import client_accounts
from mailrelay.tls import DEFAULT_CA

from .client import ClientOptions, Hop, SmtpClient
from .client_auth import parse_client_auth_config
from .client_tls import ClientTls
from .dane import validating_resolver
from .hop import SECURITY_STATUS
from .limits import Limits
from .mta_sts import MtaSts
from .mx import MxError, resolve_mail_hosts
from .routing import RoutingTable, parse_next_hop
from .security import TransportSecurity

log = logging.getLogger("mailrelay.forward")


@dataclass
class ForwardSettings:
    to: str = ""                        # --forward-to host:port[@socks-host:port], or "mx"
    mx_port: int = 25                   # port used for hosts found by MX (tests use a high port)
    connection_timeout: float = 40.0    # --connection-timeout
    response_timeout: float = 60.0      # --response-timeout
    client_interface: str = ""          # --client-interface: local address to connect from
    tls: Literal["opportunistic", "required", "off"] = "opportunistic"  # --client-tls(-required)
    tls_verify: bool = False            # verify against the system CAs (or tls_ca) and the host name
    tls_connection: bool = False        # --client-tls-connection: TLS from the first byte (SMTPS)
    tls_certificate: str = ""           # --client-tls-certificate: PEM key + chain shown to the next hop
    tls_key: str = ""                   # the first of two --client-tls-certificate options
    tls_ca: str = ""                    # --client-tls-verify: CA file or directory, or "<default>"
    tls_verify_name: str = ""           # --client-tls-verify-name: the name the certificate must carry
    tls_server_name: str = ""           # --client-tls-server-name: SNI
    connections_per_destination: int = 4
    recipients: Literal["some", "all"] = "some"  # --forward-to-some / --forward-to-all
    pipelining: bool = True             # --client-smtp-config [-]pipelining
    client_auth: str = ""               # --client-auth FILE: E-MailRelay secrets file, first "client" line
    client_auth_config: str = ""        # --client-auth-config: m:PREFER;x:AVOID (a:/d: under TLS)

    def __post_init__(self) -> None:
        """E-MailRelay's rules for combining the client options; paths made absolute (the daemon
        changes directory before reading them)."""
        self.auth_preference = parse_client_auth_config(self.client_auth_config)
        if self.client_auth_config and not self.client_auth:
            raise ConfigError("[forward] client_auth_config (--client-auth-config) needs client_auth "
                              "(--client-auth)")
        if self.tls_verify_name and not (self.tls_ca or self.tls_verify):
            raise ConfigError("[forward] tls_verify_name (--client-tls-verify-name) needs tls_ca "
                              "(--client-tls-verify)")
        if self.tls_key and not self.tls_certificate:
            raise ConfigError("[forward] tls_key needs tls_certificate (--client-tls-certificate)")
        if self.tls == "off":
            for key in ("tls_verify", "tls_connection", "tls_certificate", "tls_ca", "tls_verify_name",
                        "tls_server_name"):
                if getattr(self, key):
                    raise ConfigError(f"[forward] {key} needs TLS, but tls = \"off\"")
        for key in ("tls_certificate", "tls_key", "tls_ca", "client_auth"):
            value = getattr(self, key)
            if value and value != DEFAULT_CA:
                setattr(self, key, os.path.abspath(os.path.expanduser(value)))

    def client_tls(self, min_version: str, max_version: str) -> ClientTls:
        """The ``--client-tls...`` settings, with ``--tls-config``'s versions."""
        return ClientTls(connection=self.tls_connection, certificate=self.tls_certificate, key=self.tls_key,
                         ca=self.tls_ca, verify_name=self.tls_verify_name, verify_host=self.tls_verify,
                         server_name=self.tls_server_name, min_version=min_version, max_version=max_version)


@dataclass
class MtaStsSettings:
    enabled: bool = False
    ca_file: str = ""                   # PEM CAs trusted besides the system's (policy and MX certificates)
    https_port: int = 443               # where policies are fetched (tests serve them on a high port)
    timeout: float = 30.0               # seconds for one policy fetch
    cache_dir: str = ""                 # policies kept across restarts; default <spool dir>/.mta-sts


@dataclass
class DaneSettings:
    enabled: bool = False               # trust the AD bit of [dns] nameservers (run a validating resolver)


class ForwardPlugin:
    """One instance per relay (the entry point names the class)."""

    def __init__(self) -> None:
        self.table: RoutingTable | None = None
        self.client: SmtpClient | None = None
        self.settings = ForwardSettings()
        self.resolver: Any = None
        self.limits = Limits({})
        self.security = TransportSecurity(mta_sts=None, dane_resolver=None)

    @hookimpl
    def relay_config_schema(self) -> dict[str, type]:
        return {"forward": ForwardSettings, "routes": dict, "limits": dict, "mta_sts": MtaStsSettings,
                "dane": DaneSettings}

    @hookimpl
    async def relay_startup(self, relay: Any) -> None:
        self.settings = relay.plugin_settings("forward")
        self.table = RoutingTable(self.settings.to, relay.plugin_settings("routes"))
        self.limits = Limits(relay.plugin_settings("limits"))
        sts: MtaStsSettings = relay.plugin_settings("mta_sts")
        dane: DaneSettings = relay.plugin_settings("dane")
        self.resolver = relay.resolver
        mta_sts = None
        if sts.enabled:
            if not 0 < sts.https_port < 65536 or sts.timeout <= 0:
                raise ConfigError("[mta_sts] https_port must be 1..65535 and timeout positive")
            cache = Path(sts.cache_dir) if sts.cache_dir else Path(relay.spool.directory) / ".mta-sts"
            try:
                mta_sts = MtaSts(relay.resolver, cache, ca_file=sts.ca_file, https_port=sts.https_port,
                                 timeout=sts.timeout)
            except (OSError, ssl.SSLError) as e:
                raise ConfigError(f"[mta_sts] ca_file {sts.ca_file}: cannot load CA certificates: {e}") from None
        if dane.enabled:  # MX and address lookups ask for the AD bit too (RFC 7672 section 2.2)
            self.resolver = validating_resolver(relay.resolver)
        self.security = TransportSecurity(mta_sts=mta_sts, dane_resolver=self.resolver if dane.enabled else None)
        s = self.settings
        options = ClientOptions(
            helo=relay.domain, connection_timeout=s.connection_timeout, response_timeout=s.response_timeout,
            client_interface=s.client_interface, tls=s.tls,
            tls_setup=s.client_tls(relay.settings.tls.min_version, relay.settings.tls.max_version),
            connections_per_destination=s.connections_per_destination, all_or_nothing=s.recipients == "all",
            pipelining=s.pipelining, accounts=client_accounts(s.client_auth) if s.client_auth else {},
            auth_preference=s.auth_preference,
            ca_file=sts.ca_file if sts.enabled else "", strict_tls=sts.enabled or dane.enabled)
        # In a worker thread: the contexts load CA stores and certificate files.
        self.client = await asyncio.to_thread(SmtpClient, options)

    @hookimpl
    async def relay_shutdown(self) -> None:
        if self.client is not None:
            await self.client.close()

    @hookimpl
    def route(self, recipient: Recipient) -> Route | None:
        assert self.table is not None
        return self.table.route_for(recipient.domain)

    @hookimpl
    async def deliver(self, route: Route, batch: list[Message]) -> list[DeliveryResult] | None:
        if route.kind not in ("smarthost", "mx") or self.client is None:
            return None
        results: list[DeliveryResult] = []
        for message in batch:
            with logs.message_context(message.id):  # --log-format=msgid
                results += await self._deliver_one(route, message)
        return results

    async def _deliver_one(self, route: Route, message: Message) -> list[DeliveryResult]:
        assert self.client is not None
        recipients = list(message.envelope.remote_recipients)
        if route.kind == "smarthost":
            target = parse_next_hop(route.destination)
            hops = [Hop(target.host, target.port, proxy=target.proxy)]
        else:
            try:
                mail_hosts = await resolve_mail_hosts(self.resolver, route.destination)
            except MxError as e:
                code = 550 if e.permanent else 451
                return [DeliveryResult(r, "perm" if e.permanent else "temp", code, f"{e.status} {e}")
                        for r in recipients]
            plan = await self.security.plan(message.id, route.destination, mail_hosts, self.settings.mx_port)
            if not plan.hops:
                reason = f"{SECURITY_STATUS} no MX host of {route.destination} may be used: " \
                         + "; ".join(plan.excluded)
                log.warning("id=%s deferred: %s", message.id, reason)
                return [DeliveryResult(r, "temp", 451, reason) for r in recipients]
            hops = plan.hops
        async with self.limits.slot(recipients[0].domain if recipients else ""):
            return await self.client.send(hops, message, recipients)
