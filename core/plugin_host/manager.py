"""Plugin discovery and registration through the ``mailrelay`` entry-point group.

Built-in plugins (``mailrelay_plugins``) and third-party packages are found the same way; only the
plugins the operator enables are imported and registered, in the order given.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Iterable

import pluggy

from .. import hookspecs

log = logging.getLogger("mailrelay.plugins")

ENTRY_POINT_GROUP = "mailrelay"


class PluginError(Exception):
    """A plugin cannot be enabled (unknown name, import failure): a start-up error."""


@dataclass(frozen=True)
class PluginInfo:
    """What ``relay plugins`` shows for one discovered plugin."""

    name: str
    value: str           # "module" or "module:attr"
    package: str         # distribution that declares the entry point
    version: str
    enabled: bool = False
    hooks: tuple[str, ...] = ()

    @property
    def builtin(self) -> bool:
        return self.value.startswith("mailrelay_plugins")


def discover() -> dict[str, importlib.metadata.EntryPoint]:
    """Every plugin entry point installed, by name (first one wins on duplicates, with a warning)."""
    found: dict[str, importlib.metadata.EntryPoint] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in found and found[ep.name].value != ep.value:
            log.warning("plugin name %r is declared twice (%s and %s); using the first",
                        ep.name, found[ep.name].value, ep.value)
            continue
        found.setdefault(ep.name, ep)
    return found


def _dist_of(ep: importlib.metadata.EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "?", "?"
    return dist.metadata["Name"] or "?", dist.version or "?"


class PluginHost:
    """Owns the pluggy manager and knows which plugins are enabled, in which order."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.order: list[str] = []
        self._available = discover()

    @property
    def available(self) -> dict[str, importlib.metadata.EntryPoint]:
        return self._available

    def enable(self, names: Iterable[str]) -> None:
        """Import and register each named plugin, in order. Unknown names are an error that lists
        the known ones; a plugin that fails to import is an error naming it."""
        names = [n.strip() for n in names if n.strip()]
        unknown = [n for n in names if n not in self._available]
        if unknown:
            known = ", ".join(sorted(self._available)) or "(none installed)"
            raise PluginError(f"unknown plugin{'s' if len(unknown) > 1 else ''} "
                              f"{', '.join(repr(n) for n in unknown)}; known plugins: {known}")
        for name in names:
            if name in self.order:
                continue
            try:
                obj = self._available[name].load()
            except Exception as e:  # any import-time failure of third-party code
                raise PluginError(f"plugin {name!r} failed to load: {type(e).__name__}: {e}") from e
            self.register(obj, name)

    def register(self, obj: Any, name: str) -> None:
        """Register an object as a plugin (tests and embedders use this directly).

        An entry point may name a module, an object, or a class; a class is instantiated here,
        so each relay gets its own plugin state.
        """
        if inspect.isclass(obj):
            try:
                obj = obj()
            except Exception as e:
                raise PluginError(f"plugin {name!r} could not be created: {type(e).__name__}: {e}") from e
        try:
            self.pm.register(obj, name=name)
        except (ValueError, pluggy.PluginValidationError) as e:
            raise PluginError(f"plugin {name!r} is invalid: {e}") from e
        self.order.append(name)
        # A plugin may name plugins it needs (``requires = ["filter-program", ...]``); they are
        # enabled right after it, unless the operator enabled them already.
        requires = getattr(obj, "requires", ())
        if requires:
            self.enable([r for r in requires if r not in self.order])

    def hooks_of(self, name: str) -> tuple[str, ...]:
        plugin = self.pm.get_plugin(name)
        if plugin is None:
            return ()
        return tuple(sorted(h.name for h in self.pm.get_hookcallers(plugin) or ()))

    def info(self) -> list[PluginInfo]:
        """Every discovered plugin, enabled ones first in their order, then the rest by name."""
        rows = []
        for name in [*self.order, *sorted(set(self._available) - set(self.order))]:
            ep = self._available.get(name)
            package, version = _dist_of(ep) if ep else ("(registered in code)", "")
            rows.append(PluginInfo(name, ep.value if ep else "", package, version,
                                   enabled=name in self.order, hooks=self.hooks_of(name)))
        return rows
