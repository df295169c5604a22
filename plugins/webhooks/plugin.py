"""``webhooks``: POST relay events to HTTP endpoints, signed, from a persistent outbox.

    [webhooks.crm]
    url = "https://hooks.example.net/mail"
    events = ["message.delivered", "message.bounced"]
    secret = "${WEBHOOK_SECRET}"

``on_event`` only builds the JSON body and hands it to the outbox's writer thread; the senders
(:mod:`.sender`) post it in the background. Mail never waits for a webhook.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import logging
import ssl
from datetime import datetime, timezone
from typing import Any

from mailrelay_sdk import Event, hookimpl

from .http import parse_url, tls_context
from .outbox import DIRECTORY, Outbox, new_event_id
from .sender import HookSender
from .settings import WebhookSettings, check_names

log = logging.getLogger("mailrelay.webhooks")


def event_body(event_id: str, event: Event, relay_domain: str) -> bytes:
    """The JSON document POSTed for ``event`` (UTF-8, compact)."""
    when = datetime.fromtimestamp(event.time, timezone.utc).isoformat(timespec="microseconds")
    document = {"id": event_id, "event": event.name, "time": when.replace("+00:00", "Z"),
                "relay": relay_domain, "message_id": event.message_id, "session_id": event.session_id,
                "data": dict(event.data)}
    return json.dumps(document, ensure_ascii=False, separators=(",", ":"), default=str).encode()


class WebhooksPlugin:
    """One instance per relay (the entry point names the class)."""

    def __init__(self) -> None:
        self.hooks: dict[str, WebhookSettings] = {}
        self.senders: dict[str, HookSender] = {}
        self.outbox: Outbox | None = None
        self.domain = ""
        self._relay: Any = None

    @hookimpl
    def relay_config_schema(self) -> dict[str, Any]:
        return {"webhooks": dict[str, WebhookSettings]}

    @hookimpl
    async def relay_startup(self, relay: Any) -> None:
        self.hooks = relay.plugin_settings("webhooks")
        check_names(self.hooks)
        self._relay = relay
        self.domain = relay.domain
        if not self.hooks:
            log.warning("webhooks enabled but no [webhooks.NAME] endpoint is configured")
            return
        spool = relay.settings.spool
        self.outbox = Outbox(relay.spool.directory / DIRECTORY, durable=spool.durability == "fsync",
                             sync_method=spool.sync_method)
        contexts: dict[str, ssl.SSLContext | None] = {}
        for name, hook in self.hooks.items():
            endpoint = parse_url(hook.url)
            # Building a context reads the CA files: off the event loop. A bad ca_file stops start-up.
            contexts[name] = await asyncio.to_thread(tls_context, hook.ca_file) if endpoint.https else None
            self.senders[name] = HookSender(name, hook, endpoint, self.outbox, contexts[name])
        waiting = await self.outbox.open()
        for name, event_ids in waiting.items():
            sender = self.senders.get(name)
            if sender is None:
                log.warning("webhooks outbox: %d event(s) for %r, which is no longer configured, left in %s",
                            len(event_ids), name, self.outbox.directory)
                continue
            for event_id in event_ids:
                sender.add(event_id)
            log.info("webhook=%s resuming %d event(s) from the outbox", name, len(event_ids))
        for sender in self.senders.values():
            sender.start()

    @hookimpl
    async def relay_shutdown(self) -> None:
        if self.outbox is None:
            return
        # Events emitted while the relay stopped (deliveries finishing) are stored first.
        await self._relay.hooks.drain_observers()
        await asyncio.gather(*(sender.stop() for sender in self.senders.values()))
        await self.outbox.close()

    def wanted_by(self, name: str) -> list[str]:
        """The webhooks whose ``events`` patterns match event ``name``."""
        return [hook for hook, s in self.hooks.items() if any(fnmatch.fnmatchcase(name, p) for p in s.events)]

    @hookimpl
    async def on_event(self, event: Event) -> None:
        if self.outbox is None:
            return
        hooks = self.wanted_by(event.name)
        if not hooks:
            return
        event_id = new_event_id()
        try:
            await self.outbox.store(event_id, hooks, event_body(event_id, event, self.domain))
        except OSError as e:
            log.error("webhooks: event %s (%s, id=%s) could not be stored in the outbox and is lost: %s",
                      event_id, event.name, event.message_id or "-", e)
            return
        for hook in hooks:
            sender = self.senders[hook]
            sender.add(event_id)
