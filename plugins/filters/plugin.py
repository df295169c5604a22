"""``filters``: the operator's filter chains, one before the 250 and one before forwarding.

    [filters]
    server = ["msgid:", "/usr/local/bin/check", "spam:127.0.0.1:783"]   # --filter a,b,c
    client = ["mx:"]                                                     # --client-filter
    timeout = 60                                                         # --filter-timeout
    delivery_dir = "/var/mail/relay"                                     # --delivery-dir

Each spec becomes a filter through the plugin that claims its scheme (``relay_filter_factory``);
a spec nobody claims stops start-up with the list of known schemes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from mailrelay_sdk import FilterResult, Message, hookimpl

from mailrelay.filtering import Filter, FilterSpec, FilterSpecError, split_spec

from . import BUILTIN_SCHEMES
from .chain import FilterChain

log = logging.getLogger("mailrelay.filters")


@dataclass
class FilterSettings:
    server: list[str] = field(default_factory=list)   # --filter: before the 250
    client: list[str] = field(default_factory=list)   # --client-filter: before forwarding
    timeout: float = 60.0                              # --filter-timeout, per filter, seconds
    delivery_dir: str = ""                             # --delivery-dir (deliver:, copy:); default: the spool
    reject_code: int = 550                             # reply for a rejecting filter that names no code


class FiltersPlugin:
    """One instance per relay (the entry point names the class)."""

    # Every built-in filter kind, so that any built-in scheme works once filters are configured.
    requires = sorted(set(BUILTIN_SCHEMES.values()))

    def __init__(self) -> None:
        self.chains: dict[str, FilterChain] = {}

    @hookimpl
    def relay_config_schema(self) -> dict[str, type]:
        return {"filters": FilterSettings}

    @hookimpl
    def relay_startup(self, relay: Any) -> None:
        settings: FilterSettings = relay.plugin_settings("filters")
        factories = _factories(relay.hooks)
        _check(settings, factories)
        for stage, specs in (("server", settings.server), ("client", settings.client)):
            built: list[tuple[FilterSpec, Filter]] = []
            for text in specs:
                scheme, argument = _claimed_scheme(text, factories)
                spec = FilterSpec(text, scheme, argument, stage, settings.timeout, relay)  # type: ignore[arg-type]
                try:
                    flt = factories[scheme][1](spec)
                except FilterSpecError:
                    raise
                except ValueError as e:
                    raise FilterSpecError(f"filter {text!r}: {e}") from None
                built.append((spec, flt))
            chain = FilterChain(stage, built, emit=relay.emit, durable=relay.spool.durable)
            self.chains[stage] = chain
            if chain:
                relay.hooks.allow_time("on_filter", chain.time_limit)
                log.info("%s filters: %s", stage, ", ".join(flt.name for _, flt in built))

    @hookimpl
    def relay_check_config(self, settings: Any, hooks: Any) -> None:
        filters: FilterSettings | None = settings.extra.get("filters")
        if filters is not None:
            _check(filters, _factories(hooks))

    @hookimpl
    async def relay_shutdown(self) -> None:
        for chain in self.chains.values():
            for _, flt in chain.filters:
                close = getattr(flt, "aclose", None)
                if close is not None:
                    try:
                        await close()
                    except Exception as e:  # shutdown goes on for the others
                        log.warning("filter=%s did not close cleanly: %s", flt.name, e)

    @hookimpl
    async def on_filter(self, message: Message, stage: str) -> FilterResult | None:
        chain = self.chains.get(stage)
        if not chain:
            return None
        return await chain.run(message)


Factories = dict[str, tuple[str, Callable[[FilterSpec], Filter]]]


def _factories(hooks: Any) -> Factories:
    """Every filter scheme the enabled plugins claim, with the claiming plugin and its factory."""
    factories: Factories = {}
    for impl in hooks.impls("relay_filter_factory"):
        def register(scheme: str, factory: Callable[[FilterSpec], Filter], _owner: str = impl.plugin_name) -> None:
            if scheme in factories and factories[scheme][0] != _owner:
                raise FilterSpecError(f"filter scheme {scheme!r} is claimed by both {factories[scheme][0]!r} "
                                      f"and {_owner!r}")
            factories[scheme] = (_owner, factory)
        impl.function(register=register)
    return factories


def _claimed_scheme(text: str, factories: Factories) -> tuple[str, str]:
    """``split_spec(text)``, or a readable error when no plugin claims the scheme."""
    scheme, argument = split_spec(text)
    if scheme not in factories:
        known = ", ".join(sorted(f"{s}:" for s in factories)) or "(none)"
        hint = (f" (its plugin {BUILTIN_SCHEMES[scheme]!r} is not enabled)"
                if scheme in BUILTIN_SCHEMES else "")
        raise FilterSpecError(f"filter {text!r}: unknown scheme {scheme!r}{hint}; known: {known}")
    return scheme, argument


def _check(settings: FilterSettings, factories: Factories) -> None:
    if not 400 <= settings.reject_code <= 599:
        raise FilterSpecError(f"[filters] reject_code {settings.reject_code} is not a 4xx or 5xx code")
    for text in (*settings.server, *settings.client):
        _claimed_scheme(text, factories)
