"""``pop3``: a POP3 server for the mail the relay delivered (E-MailRelay's ``--pop``).

Enabled by ``--pop`` or ``[plugins] enable = ["pop3"]``::

    [pop3]
    port = 110
    auth = "/etc/mailrelay/pop.secrets"   # --pop-auth: "server" lines of a secrets file, or "pam:"
    by_name = true                        # --pop-by-name: user X reads the mailbox <delivery dir>/X

The server itself is :mod:`.server` (sessions in :mod:`.protocol`), the mailboxes
:mod:`.maildir` and :mod:`.spooldir`, logins :mod:`.login` (the ``auth`` plugin's secrets file,
PAM and throttle).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from mailrelay.config.loader import ConfigError
from mailrelay.tls import ServerTls
from mailrelay_sdk import hookimpl

from .login import Authenticator
from .server import Pop3Server
from .settings import Pop3Settings

log = logging.getLogger("mailrelay.pop3")


def mailbox_root(relay: Any, settings: Pop3Settings) -> Path:
    """Where ``--pop-by-name`` mailboxes are: ``[pop3] directory``, else the delivery directory
    that ``deliver:`` and ``copy:`` fill (``--delivery-dir``), else the spool directory."""
    configured = settings.directory
    if not configured:
        try:
            configured = relay.plugin_settings("filters").delivery_dir
        except KeyError:  # the filters plugin is not enabled
            configured = ""
    return Path(configured or relay.spool.directory).expanduser().resolve()


class Pop3Plugin:
    """One instance per relay (the entry point names the class)."""

    def __init__(self) -> None:
        self.server: Pop3Server | None = None

    @hookimpl
    def relay_config_schema(self) -> dict[str, type]:
        return {"pop3": Pop3Settings}

    @hookimpl
    async def relay_startup(self, relay: Any) -> None:
        settings: Pop3Settings = relay.plugin_settings("pop3")
        if not settings.auth:
            raise ConfigError("[pop3] auth: give a secrets file or pam: (--pop-auth)")
        tls_settings = relay.settings.tls
        if settings.tls_port and not tls_settings.certificate:
            raise ConfigError("[pop3] tls_port: POP3S needs a server certificate (--server-tls-certificate)")
        auth = Authenticator(settings, relay.emit)
        try:
            await asyncio.to_thread(auth.load)
            tls = await ServerTls.load(tls_settings) if tls_settings.certificate else None
        except BaseException:
            auth.close()
            raise
        root = mailbox_root(relay, settings)
        if settings.by_name:
            root.mkdir(mode=0o770, parents=True, exist_ok=True)
        elif relay.hooks.has("deliver") and not settings.no_delete:
            log.warning("pop3: serving the spool itself while messages are forwarded: a POP client that "
                        "deletes takes mail off the queue (consider --pop-by-name or --pop-no-delete)")
        self.server = Pop3Server(relay, settings, auth, root, tls)

    @hookimpl
    def relay_listeners(self, relay: Any) -> list[Any]:
        return [self.server] if self.server is not None else []

    @hookimpl
    def relay_shutdown(self) -> None:
        self.server = None
