"""The relay: wires settings, plugins, spool, resolver and listeners, and runs them.

Embedders and the SDK's test harness use :class:`Relay` directly; the CLI adds daemonising,
the pid file and signals around it (``mailrelay.daemon``).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from typing import Any, Mapping

import dns.asyncresolver

from . import net
from .config.settings import Settings
from .dns import make_resolver
from .plugin_host import HookCaller, PluginHost
from .queue.runner import PassSummary, QueueRunner
from .smtp.reception import Reception
from .smtp.server import SmtpServer
from .spool import Spool
from .types import Event

log = logging.getLogger("mailrelay")


class Relay:
    """One relay instance. Life cycle: ``bind()`` (may be before a fork), ``start()``, ``stop()``."""

    def __init__(self, settings: Settings, plugins: PluginHost,
                 inherited: Mapping[str, list[socket.socket]] | None = None):
        """``inherited``: listening sockets from the service manager by listener name (``smtp``,
        ``submission``, ``pop``, ``admin``; see :func:`mailrelay.systemd.activated_sockets`)."""
        self.settings = settings
        self.plugins = plugins
        self.hooks = HookCaller(plugins, timeout=settings.plugins.hook_timeout)
        self.domain = settings.server.effective_domain()
        self.spool = Spool(settings.spool.dir, durable=settings.spool.durability == "fsync",
                           sync_method=settings.spool.sync_method)
        self.resolver: dns.asyncresolver.Resolver = make_resolver(settings.dns)
        self.smtp_sockets: list[socket.socket] = []
        self.smtp: SmtpServer | None = None
        self.listeners: list[Any] = []
        self.queue: QueueRunner | None = None
        self.reception = Reception(self)  # SMTP sessions and injected messages (mailrelay.inject)
        self._inherited = {name: list(socks) for name, socks in (inherited or {}).items() if socks}
        self._claimed: set[str] = set()
        self._started = False
        self._stopped = asyncio.Event()  # binds to the running loop on first use

    # ---------------------------------------------------------------- set-up
    def bind(self) -> None:
        """Bind the SMTP sockets (before daemonising, so errors reach the caller)."""
        if not self.settings.smtp.enabled or self.smtp_sockets:
            return
        smtp = self.settings.smtp
        inherited = self.inherited_sockets("smtp") + self.inherited_sockets("submission")
        # Sockets from the service manager replace the default address; --interface may add more.
        explicit = [item for item in smtp.interface if item.partition("=")[0] in ("smtp", item)]
        addresses = [] if inherited and not explicit else \
            net.addresses_for("smtp", smtp.interface, any_default=smtp.remote_clients)
        self.smtp_sockets.extend(inherited)
        unix_mode = int(self.settings.server.unix_socket_mode, 8)
        for address in addresses:
            try:
                self.smtp_sockets.append(net.bind(address, smtp.port, unix_mode=unix_mode))
            except net.BindError as e:
                # The implicit "::" of the any-address default may not exist on an IPv4-only host.
                if not smtp.interface and address == "::" and e.errno in (errno.EAFNOSUPPORT,
                                                                        errno.EADDRNOTAVAIL):
                    continue
                self.close_sockets(remove_files=True)
                raise
            except ValueError:
                self.close_sockets(remove_files=True)
                raise

    def close_sockets(self, remove_files: bool = False) -> None:
        """Close the SMTP sockets; ``remove_files``: also the Unix socket files this process made
        (not in a parent that hands the sockets to a daemon child)."""
        for sock in self.smtp_sockets:
            sock.close()
            if remove_files:
                net.remove_socket_file(sock)
        self.smtp_sockets.clear()

    def inherited_sockets(self, name: str) -> list[socket.socket]:
        """Listening sockets the service manager passed for listener ``name`` (systemd's
        ``FileDescriptorName=``: ``smtp``, ``submission``, ``pop``, ``admin``), non-blocking and
        close-on-exec; empty without socket activation.

        The listener that serves them calls this (the POP3 server with ``"pop"``, say), which
        claims them: sockets that nobody claimed once the listeners have started are a start-up
        error, so that a socket unit never listens for nothing.
        """
        self._claimed.add(name)
        return list(self._inherited.get(name, []))

    def _check_inherited_claimed(self) -> None:
        hints = {"smtp": "the SMTP server is disabled", "submission": "the SMTP server is disabled",
                 "pop": "enable the POP3 server (--pop)", "admin": "enable the admin server (--admin)"}
        for name, socks in self._inherited.items():
            if name not in self._claimed:
                raise ValueError(f"socket activation passed {len(socks)} socket(s) named {name!r} but nothing "
                                 f"serves them: {hints.get(name, 'no listener takes that name')}")

    def plugin_settings(self, section: str) -> Any:
        """The validated settings object a plugin declared with ``relay_config_schema``."""
        return self.settings.extra[section]

    @property
    def smtp_addresses(self) -> list[str]:
        return [net.describe(s) for s in self.smtp_sockets]

    @property
    def smtp_port(self) -> int:
        """The bound SMTP port (useful when configured as 0 in tests); 0 with Unix sockets only."""
        return next((s.getsockname()[1] for s in self.smtp_sockets if net.is_inet(s)), 0)

    def emit(self, name: str, **data: Any) -> None:
        """Publish an event to ``on_event`` observers (plugins use this too)."""
        self.hooks.emit(Event(name, message_id=str(data.pop("message_id", "")), data=data))

    # ---------------------------------------------------------------- running
    async def start(self) -> None:
        """Open the spool, run start-up hooks, start listeners. Raises on any failure."""
        self.bind()
        self.spool.open()
        try:
            self.spool.sweep_orphans()
            await self.hooks.each("relay_startup", relay=self)
            for result in await self.hooks.each("relay_listeners", relay=self):
                for listener in result if isinstance(result, (list, tuple)) else [result]:
                    await listener.start()
                    self.listeners.append(listener)
            self._check_inherited_claimed()
            if self.hooks.has("deliver"):
                self.queue = QueueRunner(self)
                if not self.settings.queue.as_client:
                    self.queue.start()
            if self.smtp_sockets:
                self.smtp = SmtpServer(self.reception, self.settings.smtp, self.domain, self.smtp_sockets,
                                       on_disconnect=self._client_disconnected)
                await self.smtp.start()
        except BaseException:
            await self._stop_listeners()
            self.spool.close()
            raise
        self._started = True
        self.emit("started", smtp=self.smtp_addresses, spool=str(self.spool.directory))
        log.info("relay started smtp=%s spool=%s plugins=%s durability=%s", ",".join(self.smtp_addresses),
                 self.spool.directory, ",".join(self.plugins.order) or "-", self.spool.sync_method)

    def message_committed(self, message_id: str) -> None:
        """A message is safely in the spool: forward it soon if so configured."""
        if self.queue is not None and not self.settings.queue.immediate and (
                self.settings.queue.after_receive or self.settings.queue.poll == 0):
            self.queue.wake()

    def _client_disconnected(self, submitted: int) -> None:
        if self.queue is not None and self.settings.queue.on_disconnect and submitted:
            self.queue.wake()

    async def forward_once(self) -> PassSummary:
        """Forward everything in the spool once (``--as-client``)."""
        if self.queue is None:
            raise RuntimeError("nothing to forward with: enable a delivery plugin (e.g. --forward-to)")
        return await self.queue.run_once()

    async def stop(self) -> None:
        """Graceful shutdown: 421 to sessions, listeners closed, hooks told, spool flushed."""
        if not self._started:
            return
        self._started = False
        if self.smtp is not None:
            await self.smtp.stop(self.settings.smtp.shutdown_grace)
        if self.queue is not None:
            await self.queue.stop(self.settings.smtp.shutdown_grace)
        await self._stop_listeners()
        try:
            await self.hooks.each("relay_shutdown", relay=self)
        except Exception:
            log.exception("a plugin failed in relay_shutdown")
        await self.hooks.drain_observers()
        self.spool.close()
        self.close_sockets(remove_files=True)
        log.info("relay stopped")
        self._stopped.set()

    async def _stop_listeners(self) -> None:
        for listener in reversed(self.listeners):
            try:
                await listener.stop()
            except Exception:
                log.exception("listener %r failed to stop cleanly", listener)
        self.listeners.clear()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

