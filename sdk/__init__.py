"""mailrelay_sdk: the stable surface for plugin authors.

Import everything a plugin needs from here, never from ``mailrelay`` internals::

    from mailrelay_sdk import hookimpl, Verdict

    @hookimpl
    def on_mail_from(session, transaction, address):
        if address.endswith("@spam.example"):
            return Verdict.deny("Sender refused", code=550, enhanced="5.7.1")
"""

from mailrelay import __version__ as core_version
from mailrelay.hookspecs import HOOKSPEC_VERSION, hookimpl
from mailrelay.message import Message
from mailrelay.spool.envelope import Envelope
from mailrelay.types import (Action, DeliveryResult, Event, FilterAction, FilterResult, Recipient, Route,
                             Session, Transaction, Verdict)

__all__ = [
    "Action", "DeliveryResult", "Envelope", "Event", "FilterAction", "FilterResult", "HOOKSPEC_VERSION",
    "Message", "Recipient", "Route", "Session", "Transaction", "Verdict", "core_version", "hookimpl",
]
