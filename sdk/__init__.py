"""mailrelay_sdk: the stable surface for plugin authors.

Import everything a plugin needs from here, never from ``mailrelay`` internals::

    from mailrelay_sdk import hookimpl, Verdict

    @hookimpl
    def on_mail_from(session, transaction, address):
        if address.endswith("@spam.example"):
            return Verdict.deny("Sender refused", code=550, enhanced="5.7.1")

What is exported here keeps its name and meaning for as long as :data:`HOOKSPEC_VERSION` stays
the same; anything else (``mailrelay.*`` modules) is private and may change in any release.
``mailrelay_sdk.script`` helps write ``pipe:`` filters in Python; ``mailrelay_sdk.testing`` is a
pytest plugin (fixtures ``relay`` and ``sink``), loaded automatically where mailrelay is installed.
"""

from mailrelay import __version__ as core_version
from mailrelay.filtering import Filter, FilterSpec, FilterSpecError
from mailrelay.hookspecs import HOOKSPEC_VERSION, hookimpl
from mailrelay.inject import Injected, InjectionRefused, inject
from mailrelay.message import Message
from mailrelay.relay import Relay
from mailrelay.spool.envelope import Envelope
from mailrelay.types import (Action, DeliveryResult, Event, FilterAction, FilterResult, Recipient, Route,
                             Session, Stage, Transaction, Verdict)

from . import events

__all__ = [
    "Action", "DeliveryResult", "Envelope", "Event", "Filter", "FilterAction", "FilterResult", "FilterSpec",
    "FilterSpecError", "HOOKSPEC_VERSION", "Injected", "InjectionRefused", "Message", "Recipient", "Relay",
    "Route", "Session", "Stage", "Transaction", "Verdict", "core_version", "events", "hookimpl", "inject",
]
