"""The relay's Prometheus metrics: counters fed by events, gauges read from the spool at scrape time.

Label values never come from what a client or a remote server chose freely: reply codes are
three digits (else ``other``), phases and outcomes come from fixed sets, and names from the
configuration (filters, DNSBL zones, SASL mechanisms) are capped per label, so a hostile peer
cannot grow the number of series.
"""

from __future__ import annotations

import collections
import os
import re
import time
from pathlib import Path
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mailrelay_sdk import Event

PHASES = frozenset({"connect", "helo", "mail", "rcpt", "data"})
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 86400, 5 * 86400)
FILTER_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
SIZE_BUCKETS = (1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 52428800)
RECEIPTS_KEPT = 100_000  # receipt times remembered for the latency histogram
_CODE = re.compile(r"\s*([2-5]\d\d)\b")
_MECHANISM = re.compile(r"[A-Z0-9_-]{1,20}")


def reply_code(value: Any) -> str:
    """``"451"`` from ``451``, ``"451 4.3.0 busy"``...; ``"other"`` for anything else."""
    m = _CODE.match(str(value))
    return m.group(1) if m else "other"


class BoundedLabel:
    """A label's values as given, until ``limit`` distinct ones were seen; then ``other``."""

    def __init__(self, limit: int = 50):
        self.limit = limit
        self.seen: set[str] = set()

    def __call__(self, value: Any) -> str:
        text = str(value)[:100]
        if text in self.seen:
            return text
        if len(self.seen) >= self.limit:
            return "other"
        self.seen.add(text)
        return text


def id_time(message_id: str) -> float | None:
    """The receipt time in a spool id (``emailrelay.<pid>.<unix-time>.<seq>``), to the second."""
    fields = message_id.split(".")
    if len(fields) >= 4 and fields[-2].isdigit():
        return float(fields[-2])
    return None


class RelayMetrics:
    """The event-fed metrics of one relay, in its own registry."""

    def __init__(self, registry: CollectorRegistry):
        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, labels, registry=registry)

        self.received = counter("mailrelay_messages_received", "Messages accepted and queued")
        self.rejected = counter("mailrelay_messages_rejected", "Refusals, by SMTP phase (rcpt: per recipient) and "
                                "reply code", ("phase", "code"))
        self.quarantined = counter("mailrelay_messages_quarantined", "Messages accepted and held as .bad")
        self.discarded = counter("mailrelay_messages_discarded", "Messages accepted and dropped (a DISCARD verdict, "
                                 "or a filter that abandoned them)", ("how",))
        self.delivered = counter("mailrelay_messages_delivered", "Deliveries, per recipient")
        self.deferred = counter("mailrelay_messages_deferred", "Temporary delivery failures, per recipient, by "
                                "reply code", ("code",))
        self.bounced = counter("mailrelay_messages_bounced", "Permanent delivery failures reported to the sender, "
                               "per recipient, by reply code", ("code",))
        self.expired = counter("mailrelay_messages_expired", "Recipients given up after queue max_age")
        self.latency = Histogram("mailrelay_delivery_latency_seconds", "From receipt to delivery, per recipient",
                                 buckets=LATENCY_BUCKETS, registry=registry)
        self.size = Histogram("mailrelay_message_size_bytes", "Size of accepted messages", buckets=SIZE_BUCKETS,
                              registry=registry)
        self.filter_duration = Histogram("mailrelay_filter_duration_seconds", "Time each filter run took",
                                         ("stage", "filter"), buckets=FILTER_BUCKETS, registry=registry)
        self.filter_results = counter("mailrelay_filter_results", "Filter runs by verdict",
                                      ("stage", "filter", "verdict"))
        self.dnsbl = counter("mailrelay_dnsbl_hits", "Clients a DNS block list named, per list", ("zone",))
        self.auth_failures = counter("mailrelay_auth_failures", "Failed SMTP AUTH attempts", ("mechanism",))
        self.auth_successes = counter("mailrelay_auth_successes", "Successful SMTP AUTH", ("mechanism",))
        self._filter_name = BoundedLabel()
        self._zone = BoundedLabel()
        self._mechanism = BoundedLabel(10)
        # message id -> [receipt time, recipients not yet delivered or bounced]
        self._receipts: collections.OrderedDict[str, list[float]] = collections.OrderedDict()

    def observe(self, event: Event) -> None:
        """Count one event (called on the event loop: cheap, no I/O)."""
        handler = getattr(self, "_on_" + event.name.replace(".", "_").replace("-", "_"), None)
        if handler is not None:
            handler(event, event.data)

    # ---------------------------------------------------------------- reception
    def _on_received(self, event: Event, data: Any) -> None:
        self.received.inc()
        if isinstance(data.get("size"), int):
            self.size.observe(data["size"])
        recipients = data.get("recipients") or ()
        self._receipts[event.message_id] = [event.time, float(len(recipients) or 1)]
        if len(self._receipts) > RECEIPTS_KEPT:
            self._receipts.popitem(last=False)

    def _on_rejected(self, event: Event, data: Any) -> None:
        self.rejected.labels("data", reply_code(data.get("code", 554))).inc()  # a mail loop has no code: 554

    def _on_smtp_rejected(self, event: Event, data: Any) -> None:
        phase = data.get("phase")
        self.rejected.labels(phase if phase in PHASES else "other", reply_code(data.get("code"))).inc()

    def _on_quarantined(self, event: Event, data: Any) -> None:
        self.quarantined.inc()

    def _on_discarded(self, event: Event, data: Any) -> None:
        self.discarded.labels("discarded").inc()

    def _on_abandoned(self, event: Event, data: Any) -> None:
        self.discarded.labels("abandoned").inc()

    _on_message_abandoned = _on_abandoned

    # ---------------------------------------------------------------- delivery
    def _on_message_delivered(self, event: Event, data: Any) -> None:
        self.delivered.inc()
        received = self._settled(event.message_id)
        if received is not None:
            self.latency.observe(max(0.0, event.time - received))

    def _on_message_deferred(self, event: Event, data: Any) -> None:
        self.deferred.labels(reply_code(data.get("error"))).inc()

    def _on_message_bounced(self, event: Event, data: Any) -> None:
        self.bounced.labels(reply_code(data.get("error"))).inc()
        self._settled(event.message_id)

    def _on_message_expired(self, event: Event, data: Any) -> None:
        self.expired.inc()

    def _settled(self, message_id: str) -> float | None:
        """One recipient is done with: the message's receipt time (forgotten after its last one)."""
        entry = self._receipts.get(message_id)
        if entry is None:  # received before a restart, or by another process sharing the spool
            return id_time(message_id)
        entry[1] -= 1
        if entry[1] <= 0:
            del self._receipts[message_id]
        return entry[0]

    # ---------------------------------------------------------------- plugins' events
    def _on_filter_done(self, event: Event, data: Any) -> None:
        stage = data.get("stage") if data.get("stage") in ("server", "client") else "other"
        name = self._filter_name(data.get("filter", ""))
        if isinstance(data.get("duration_ms"), (int, float)):
            self.filter_duration.labels(stage, name).observe(data["duration_ms"] / 1000)
        verdict = data.get("verdict") if data.get("verdict") in ("ok", "reject", "abandon", "fail") else "other"
        self.filter_results.labels(stage, name, verdict).inc()

    def _on_dnsbl_listed(self, event: Event, data: Any) -> None:
        # "zen.example=127.0.0.2+127.0.0.4 bl.example=127.0.0.2"
        for listing in str(data.get("lists", "")).split():
            self.dnsbl.labels(self._zone(listing.partition("=")[0].lower())).inc()

    def _auth(self, counter: Counter, event: Event, data: Any) -> None:
        # One event per attempt: the core's for SMTP AUTH, the POP3 and admin plugins' for theirs.
        mechanism = str(data.get("mechanism", "")).upper()
        counter.labels(self._mechanism(mechanism) if _MECHANISM.fullmatch(mechanism) else "other").inc()

    def _on_auth_failed(self, event: Event, data: Any) -> None:
        self._auth(self.auth_failures, event, data)

    def _on_auth_succeeded(self, event: Event, data: Any) -> None:
        self._auth(self.auth_successes, event, data)


_STATES = ((".envelope", "ready"), (".envelope.busy", "busy"), (".envelope.bad", "bad"), (".envelope.new", "new"))


class ScrapeTimeCollector(Collector):
    """Queue size and age from one listing of the spool directory (no file is opened or stat'ed
    for spool ids, whose names carry the receipt time), and the SMTP connection counts."""

    def __init__(self, relay: Any):
        self.relay = relay
        self.directory = Path(relay.spool.directory)

    def collect(self) -> Iterator[Metric]:
        counts = dict.fromkeys(("ready", "busy", "bad", "new"), 0)
        oldest: float | None = None
        try:
            entries = os.scandir(self.directory)
        except OSError:
            entries = None
        if entries is not None:
            with entries:
                for entry in entries:
                    for suffix, state in _STATES:
                        if entry.name.endswith(suffix):
                            counts[state] += 1
                            if state in ("ready", "busy"):
                                received = self._received(entry, entry.name[: -len(suffix)])
                                if received is not None and (oldest is None or received < oldest):
                                    oldest = received
                            break
        queue = GaugeMetricFamily("mailrelay_queue_messages", "Messages in the spool, by state (ready: waiting "
                                  "to be forwarded, busy: being forwarded, bad: failed or held, new: being "
                                  "received)", labels=["state"])
        for state, count in counts.items():
            queue.add_metric([state], count)
        yield queue
        yield GaugeMetricFamily("mailrelay_queue_oldest_message_age_seconds", "Age of the oldest message waiting "
                                "to be forwarded (ready or busy); 0 when there is none",
                                value=max(0.0, time.time() - oldest) if oldest is not None else 0.0)
        smtp = getattr(self.relay, "smtp", None)
        yield CounterMetricFamily("mailrelay_smtp_connections", "SMTP connections accepted",
                                  value=getattr(smtp, "connections_total", 0))
        yield GaugeMetricFamily("mailrelay_smtp_connections_open", "SMTP sessions open now",
                                value=len(smtp.sessions) if smtp is not None else 0)

    @staticmethod
    def _received(entry: os.DirEntry[str], message_id: str) -> float | None:
        received = id_time(message_id)
        if received is None:  # a name from some other tool: ask the file system
            try:
                received = entry.stat().st_mtime
            except OSError:
                return None
        return received
