"""``forward``: route remote recipients to a smarthost or by DNS MX, and deliver them over SMTP.

Enabled by ``--forward-to`` / ``--as-client`` / ``--as-proxy`` or ``[plugins] enable = ["forward"]``.

    [forward]
    to = "smtp.example.net:587"   # or "mx"
    [routes]
    "example.com" = "mail.example.com:25"
    "*.internal.example" = "10.0.0.5:25"
    "*" = "mx"
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from mailrelay_sdk import DeliveryResult, Message, Recipient, Route, hookimpl

from mailrelay.secrets import client_accounts

from .client import ClientOptions, SmtpClient
from .limits import Limits
from .mx import MxError, resolve_mail_hosts
from .routing import RoutingTable, parse_hostport


@dataclass
class ForwardSettings:
    to: str = ""                        # --forward-to host:port, or "mx"
    mx_port: int = 25                   # port used for hosts found by MX (tests use a high port)
    connection_timeout: float = 40.0    # --connection-timeout
    response_timeout: float = 60.0      # --response-timeout
    client_interface: str = ""          # --client-interface: local address to connect from
    tls: Literal["opportunistic", "required", "off"] = "opportunistic"
    tls_verify: bool = False
    connections_per_destination: int = 4
    recipients: Literal["some", "all"] = "some"  # --forward-to-some / --forward-to-all
    pipelining: bool = True             # --client-smtp-config [-]pipelining
    client_auth: str = ""               # --client-auth FILE: E-MailRelay secrets file, first "client" line


class ForwardPlugin:
    """One instance per relay (the entry point names the class)."""

    def __init__(self) -> None:
        self.table: RoutingTable | None = None
        self.client: SmtpClient | None = None
        self.settings = ForwardSettings()
        self.resolver: Any = None
        self.limits = Limits({})

    @hookimpl
    def relay_config_schema(self) -> dict[str, type]:
        return {"forward": ForwardSettings, "routes": dict, "limits": dict}

    @hookimpl
    def relay_startup(self, relay: Any) -> None:
        self.settings = relay.plugin_settings("forward")
        self.table = RoutingTable(self.settings.to, relay.plugin_settings("routes"))
        self.limits = Limits(relay.plugin_settings("limits"))
        self.resolver = relay.resolver
        s = self.settings
        self.client = SmtpClient(ClientOptions(
            helo=relay.domain, connection_timeout=s.connection_timeout, response_timeout=s.response_timeout,
            client_interface=s.client_interface, tls=s.tls, tls_verify=s.tls_verify,
            connections_per_destination=s.connections_per_destination, all_or_nothing=s.recipients == "all",
            pipelining=s.pipelining, accounts=client_accounts(s.client_auth) if s.client_auth else {}))

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
            recipients = list(message.envelope.remote_recipients)
            if route.kind == "smarthost":
                hosts = [parse_hostport(route.destination)]
            else:
                try:
                    mail_hosts = await resolve_mail_hosts(self.resolver, route.destination)
                except MxError as e:
                    code = 550 if e.permanent else 451
                    results += [DeliveryResult(r, "perm" if e.permanent else "temp", code, f"{e.status} {e}")
                                for r in recipients]
                    continue
                hosts = [(address, self.settings.mx_port) for host in mail_hosts for address in host.addresses]
            async with self.limits.slot(recipients[0].domain if recipients else ""):
                results += await self.client.send(hosts, message, recipients)
        return results
