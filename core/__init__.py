"""mailrelay: a plugin-host SMTP store-and-forward relay, compatible with E-MailRelay.

The import package of ``core/``. Plugin authors import from ``mailrelay_sdk`` instead.
"""

__version__ = "0.1.0"
