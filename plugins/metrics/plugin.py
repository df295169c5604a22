"""``metrics``: Prometheus metrics at ``/metrics``, in the admin server and optionally on their own port.

    [metrics]
    listen = "127.0.0.1:9101"   # the standalone exporter; "" (the default): only the admin's /metrics

The admin web server mounts :meth:`MetricsPlugin.relay_admin_blueprint` behind its login. The
standalone exporter has no authentication, so it listens on loopback unless ``allow_remote``.
Each relay has its own registry: two relays in one process never mix their numbers.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import threading
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, start_http_server

from mailrelay_sdk import Event, hookimpl

from mailrelay.config.loader import ConfigError

from .collectors import RelayMetrics, ScrapeTimeCollector

log = logging.getLogger("mailrelay.metrics")


def parse_listen(text: str) -> tuple[str, int]:
    """``"9101"``, ``"127.0.0.1:9101"``, ``"[::1]:9101"``, ``"localhost:9101"`` to (host, port)."""
    text = text.strip()
    host, _, port = text.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ConfigError(f"[metrics] listen: {text!r} is not [ADDRESS:]PORT")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class MetricsSettings:
    listen: str = ""            # [ADDRESS:]PORT of the standalone exporter; "" = none
    allow_remote: bool = False  # let `listen` be a non-loopback address (the exporter has no login)

    def __post_init__(self) -> None:
        if self.listen:
            host, _ = parse_listen(self.listen)
            if not is_loopback(host) and not self.allow_remote:
                raise ConfigError(f"[metrics] listen: {self.listen!r} is not a loopback address, and the "
                                  "exporter has no authentication; use the admin server's /metrics, or set "
                                  "allow_remote = true (behind a firewall)")


class Exporter:
    """prometheus_client's exporter: its HTTP server runs in a thread of its own."""

    def __init__(self, registry: CollectorRegistry, listen: str):
        self.registry = registry
        self.host, self.port = parse_listen(listen)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    async def start(self) -> None:
        # Binding resolves the address: off the event loop, like the serving.
        try:
            self._server, self._thread = await asyncio.to_thread(start_http_server, self.port, self.host,
                                                                 self.registry)
        except OSError as e:
            raise OSError(e.errno, f"[metrics] listen {self.host}:{self.port}: {e.strerror or e}") from None
        log.info("metrics exporter listening on %s:%d", self.host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            server, thread = self._server, self._thread
            self._server = self._thread = None

            def shut() -> None:
                server.shutdown()
                server.server_close()
                if thread is not None:
                    thread.join(5)
            await asyncio.to_thread(shut)


class MetricsPlugin:
    """One instance per relay (the entry point names the class)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.metrics = RelayMetrics(self.registry)
        self.settings = MetricsSettings()
        self._scrape_time: ScrapeTimeCollector | None = None

    @hookimpl
    def relay_config_schema(self) -> dict[str, type]:
        return {"metrics": MetricsSettings}

    @hookimpl
    def relay_startup(self, relay: Any) -> None:
        self.settings = relay.plugin_settings("metrics")
        if self._scrape_time is None:
            self._scrape_time = ScrapeTimeCollector(relay)
            self.registry.register(self._scrape_time)

    @hookimpl
    def relay_listeners(self) -> list[Any] | None:
        return [Exporter(self.registry, self.settings.listen)] if self.settings.listen else None

    @hookimpl
    def on_event(self, event: Event) -> None:
        self.metrics.observe(event)

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format (what a scrape gets)."""
        return generate_latest(self.registry)

    @hookimpl
    def relay_admin_blueprint(self) -> Any:
        from flask import Blueprint, Response  # Flask is only needed when the admin server runs

        blueprint = Blueprint("metrics", __name__)

        @blueprint.get("/metrics")
        def metrics() -> Response:
            return Response(self.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

        return blueprint
