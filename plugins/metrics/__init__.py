"""``metrics``: Prometheus metrics of the relay (see :mod:`.plugin`)."""

from .plugin import MetricsPlugin

__all__ = ["MetricsPlugin"]
