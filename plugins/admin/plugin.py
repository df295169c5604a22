"""``admin``: the web UI and JSON API (``--admin PORT``), served by cheroot beside the relay.

    [admin]
    listen = ["8025"]                      # --admin 8025; loopback unless --interface admin=ADDR
    tls_certificate = "/etc/mailrelay/admin.pem"   # HTTPS (key and chain in one PEM, or tls_key)
    auth = ""                              # default: [auth] server_auth (secrets file or pam:)

What it does for the core:

* ``relay_listeners``: the HTTP(S) server, started after ``relay_startup`` and stopped on shutdown;
  its worker threads hand work that belongs to the relay (injections, bounces, waking the queue)
  to the event loop captured at start;
* ``on_event``: keeps recent events and counts them, for ``/api/v1/events``, the event stream,
  ``/api/v1/stats`` and the dashboard;
* ``relay_cli``: ``relay token create|list|revoke`` for API tokens;
* mounts every blueprint other plugins return from ``relay_admin_blueprint``, behind the same
  authentication.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import click

from mailrelay import net
from mailrelay.config.loader import ConfigError
from mailrelay_sdk import Event, hookimpl

from mailrelay_plugins.auth.backend import Backend, SecretsFileBackend
from mailrelay_plugins.auth.pam_backend import PamBackend
from mailrelay_plugins.auth.throttle import ThrottlePolicy

from .auth import Authenticator, Sessions, emitter
from .cli import token_group
from .events import EventLog
from .server import AdminServer
from .settings import AdminSettings
from .tokens import TokenStore

log = logging.getLogger("mailrelay.admin")


class AdminPlugin:
    """One instance per relay (the entry point names the class)."""

    def __init__(self) -> None:
        self.settings = AdminSettings()
        self.events: EventLog | None = None
        self.backend: Backend | None = None
        self.source = ""
        self.policy = ThrottlePolicy()
        self.failure_delay = 1.0
        self.addresses: list[tuple[str, int]] = []
        self.started = False  # the relay has announced it is serving (readyz)
        self.listener: AdminListener | None = None

    @hookimpl
    def relay_config_schema(self) -> dict[str, type]:
        return {"admin": AdminSettings}

    @hookimpl
    def relay_cli(self, cli: click.Group) -> None:
        cli.add_command(token_group)

    @hookimpl
    async def relay_startup(self, relay: Any) -> None:
        settings: AdminSettings = relay.plugin_settings("admin")
        self.settings = settings
        self.events = EventLog(settings.events)
        self.addresses = listen_addresses(settings, relay.settings.smtp.interface)
        auth_settings = relay.settings.extra.get("auth")  # the auth plugin's section, when enabled
        self.source = settings.auth or (auth_settings.server_auth if auth_settings is not None else "")
        if auth_settings is not None:
            self.policy, self.failure_delay = auth_settings.throttle_policy, auth_settings.failure_delay
        if self.source.lower().startswith("pam:"):
            service = self.source[4:] or settings.pam_service or (
                auth_settings.pam_service if auth_settings is not None else "relay")
            self.backend = await asyncio.to_thread(PamBackend, service)
        elif self.source:
            self.backend = await asyncio.to_thread(SecretsFileBackend, self.source)
        else:
            log.warning("admin: no accounts for logins ([admin] auth or [auth] server_auth): only API tokens "
                        "(relay token create NAME) can be used")
        tokens = settings.tokens_path(relay.settings.spool.dir)
        try:
            if os.stat(tokens).st_mode & 0o077:
                log.warning("admin: %s can be read by others than its owner (chmod 600 it)", tokens)
        except FileNotFoundError:
            pass

    @hookimpl
    def relay_listeners(self, relay: Any) -> list[Any] | None:
        if relay.settings.queue.as_client:  # --as-client forwards once and exits: nothing to serve
            return None
        self.listener = AdminListener(self, relay)
        return [self.listener]

    @hookimpl
    def on_event(self, event: Event) -> None:
        if self.events is not None:
            self.events.add(event)
        if event.name == "started":
            self.started = True

    @hookimpl
    def relay_shutdown(self) -> None:
        self.started = False


def listen_addresses(settings: AdminSettings, interface: list[str]) -> list[tuple[str, int]]:
    """``[admin] listen`` resolved: a bare port listens where ``--interface`` says for ``admin``
    (``admin=ADDR`` items and unprefixed ones), else on loopback only."""
    out: list[tuple[str, int]] = []
    for item in settings.addresses:
        if item.host:
            out.append((item.host, item.port))
            continue
        try:
            hosts = net.addresses_for("admin", interface, any_default=False) or ["127.0.0.1"]
        except ValueError as e:
            raise ConfigError(str(e)) from None
        out += [(host, item.port) for host in hosts]
    return list(dict.fromkeys(out))


class AdminListener:
    """The relay's handle on the admin server (``async start()``/``stop()``)."""

    def __init__(self, plugin: AdminPlugin, relay: Any) -> None:
        self.plugin = plugin
        self.relay = relay
        self.server: AdminServer | None = None
        self.app: Any = None
        self.context: Any = None

    @property
    def urls(self) -> list[str]:
        return self.server.urls if self.server is not None else []

    async def start(self) -> None:
        from .app import AdminContext, create_app  # Flask is imported only when the server starts

        plugin, relay, settings = self.plugin, self.relay, self.plugin.settings
        assert plugin.events is not None
        loop = asyncio.get_running_loop()
        auth = Authenticator(plugin.backend, plugin.policy, plugin.failure_delay,
                             TokenStore(settings.tokens_path(relay.settings.spool.dir)), emitter(loop, relay),
                             plugin.source)
        self.context = AdminContext(relay, loop, settings, auth, Sessions(settings.session_lifetime), plugin.events,
                                    ready=lambda: plugin.started)
        blueprints: list[Any] = []
        for result in await relay.hooks.each("relay_admin_blueprint", relay=relay):
            blueprints += result if isinstance(result, (list, tuple)) else [result]
        self.app = create_app(self.context, blueprints)
        # Sockets from systemd's socket activation (FileDescriptorName=admin) replace the listen
        # items that give only a port; items that name an address are bound as well.
        claim = getattr(relay, "inherited_sockets", None)
        inherited = claim("admin") if claim is not None else []
        addresses = plugin.addresses if not inherited else [(i.host, i.port) for i in settings.addresses if i.host]
        unix_mode = int(getattr(relay.settings.server, "unix_socket_mode", "0660"), 8)
        self.server = AdminServer(self.app, addresses, settings.threads, settings.tls_certificate,
                                  settings.tls_key, inherited, unix_mode)
        await self.server.start()
        log.info("admin: serving on %s (logins: %s; tokens: %s)", ", ".join(self.server.urls),
                 plugin.source or "none", auth.tokens.path)

    async def stop(self) -> None:
        if self.plugin.events is not None:
            self.plugin.events.close()  # event streams end, so their threads can finish
        if self.server is not None:
            await self.server.stop()
