"""__plugin_package__: a mailrelay plugin.

Enable it with ``relay --plugins __plugin_name__`` (or ``[plugins] enable = ["__plugin_name__"]``)
and configure it in the ``[__plugin_section__]`` section of relay.conf. Import only from
``mailrelay_sdk``: that is the surface mailrelay keeps stable.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mailrelay_sdk import Recipient, Relay, Verdict, hookimpl

__version__ = "0.1.0"


@dataclass
class Settings:
    """The ``[__plugin_section__]`` section of relay.conf, validated by the relay at start-up."""

    refused_domains: list[str] = field(default_factory=list)


class Plugin:
    """The entry point names this class; the relay makes one instance per relay."""

    #: The mailrelay versions this plugin works with (a PEP 440 specifier), checked at start-up.
    requires_core = ">=__core_version__"
    #: The hook spec version it was written for (``mailrelay_sdk.HOOKSPEC_VERSION``).
    hookspec_version = __hookspec_version__

    def __init__(self) -> None:
        self.settings = Settings()

    @hookimpl
    def relay_config_schema(self) -> dict[str, type]:
        return {"__plugin_section__": Settings}

    @hookimpl
    def relay_startup(self, relay: Relay) -> None:
        self.settings = relay.plugin_settings("__plugin_section__")

    @hookimpl
    async def on_rcpt_to(self, recipient: Recipient) -> Verdict | None:
        """Refuse recipients in the configured domains; no opinion on the rest."""
        if recipient.domain in self.settings.refused_domains:
            return Verdict.deny("No mail for that domain here", code=550, enhanced="5.7.1")
        return None
