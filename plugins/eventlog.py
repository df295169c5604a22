"""``eventlog``: one structured log line per relay event (received, rejected, delivered, ...).

Useful on its own and as the smallest example of an observer plugin.
"""

from __future__ import annotations

import json
import logging

from mailrelay_sdk import Event, hookimpl

log = logging.getLogger("mailrelay.events")


@hookimpl
def on_event(event: Event) -> None:
    fields = " ".join(f"{k}={json.dumps(v, default=str)}" for k, v in sorted(event.data.items()))
    log.warning("event=%s id=%s session=%s %s", event.name, event.message_id or "-",
                event.session_id or "-", fields)
