"""``webhooks``: signed HTTP POSTs of relay events from a persistent outbox (see :mod:`.plugin`)."""

from .plugin import WebhooksPlugin

__all__ = ["WebhooksPlugin"]
