"""The names of the events ``on_event`` observers receive (``Event.name``).

Compare against these constants rather than string literals, so a typo fails at import time::

    from mailrelay_sdk import events, hookimpl

    @hookimpl
    def on_event(event):
        if event.name == events.MESSAGE_BOUNCED:
            ...

``event.data`` holds the details (client address, sender, recipients, reply code, ...); the core
adds keys over time but never removes or renames one within a hook spec version.
"""

from __future__ import annotations

# The relay is serving (data: smtp addresses, spool directory).
STARTED = "started"
# SMTP reception (data: client, sender, recipients, size; reason and code for rejections).
RECEIVED = "received"
REJECTED = "rejected"
DISCARDED = "discarded"
ABANDONED = "abandoned"        # a server filter took the message (exit 100)
QUARANTINED = "quarantined"
AUTH_SUCCEEDED = "auth.succeeded"
AUTH_FAILED = "auth.failed"
DNSBL_LISTED = "dnsbl.listed"
# Filters (data: filter, spec, stage, verdict, code, duration).
FILTER_DONE = "filter.done"
MESSAGE_ARCHIVED = "message.archived"
# The queue runner, one per recipient outcome.
MESSAGE_DELIVERED = "message.delivered"
MESSAGE_DEFERRED = "message.deferred"
MESSAGE_BOUNCED = "message.bounced"
MESSAGE_EXPIRED = "message.expired"
MESSAGE_DELAY_WARNED = "message.delay-warned"
MESSAGE_ABANDONED = "message.abandoned"  # a client filter took the message
# The pickup directory (data: file, reason) when a file is moved to bad/.
PICKUP_REFUSED = "pickup.refused"

ALL: frozenset[str] = frozenset(value for key, value in dict(globals()).items()
                                if key.isupper() and isinstance(value, str))

__all__ = sorted(key for key in dict(globals()) if key.isupper())
