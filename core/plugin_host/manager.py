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
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import Version

from .. import __version__, hookspecs

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


def check_compatible(obj: Any, name: str, described: str | None = None) -> None:
    """Refuse a plugin written for another core: raise :class:`PluginError` naming both versions.

    A plugin (module, class or object) may declare ``requires_core``, a PEP 440 specifier for
    the mailrelay version (``">=0.2"``: it uses a hook added in 0.2), and ``hookspec_version``,
    the :data:`~mailrelay.hookspecs.HOOKSPEC_VERSION` it was written for (that number changes
    only with an incompatible change to the hooks, so it must be equal).
    """
    described = described or f"plugin {name!r}"
    requires = getattr(obj, "requires_core", None)
    if requires is not None:
        try:
            specifier = SpecifierSet(str(requires))
        except InvalidSpecifier:
            raise PluginError(f"{described} declares requires_core = {requires!r}, which is not a version "
                              "specifier such as \">=0.2\"") from None
        if not specifier.contains(Version(__version__), prereleases=True):
            raise PluginError(f"{described} needs mailrelay {specifier}; this is mailrelay {__version__}: "
                              "upgrade mailrelay, or install a version of the plugin made for this one")
    wanted = getattr(obj, "hookspec_version", None)
    if wanted is not None and wanted != hookspecs.HOOKSPEC_VERSION:
        raise PluginError(f"{described} was written for hook spec version {wanted}; mailrelay {__version__} "
                          f"implements hook spec version {hookspecs.HOOKSPEC_VERSION}: install a version of "
                          "the plugin made for it" + (", or upgrade mailrelay" if isinstance(wanted, int)
                                                       and wanted > hookspecs.HOOKSPEC_VERSION else ""))


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
        so each relay gets its own plugin state. A plugin that declares another core or hook
        spec version (:func:`check_compatible`) is refused before any part of it is registered.
        """
        check_compatible(obj, name, self._describe(name))
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
        unknown = sorted(c.name for c in self.pm.get_hookcallers(obj) or () if c.spec is None)
        if unknown:  # pluggy accepts them silently; they would never be called
            log.warning("plugin %r implements hooks this mailrelay %s does not have: %s (written for a "
                        "newer mailrelay?)", name, __version__, ", ".join(unknown))
        # A plugin may name plugins it needs (``requires = ["filter-program", ...]``); they are
        # enabled right after it, unless the operator enabled them already.
        requires = getattr(obj, "requires", ())
        if requires:
            self.enable([r for r in requires if r not in self.order])

    def _describe(self, name: str) -> str:
        ep = self._available.get(name)
        if ep is None:
            return f"plugin {name!r}"
        package, version = _dist_of(ep)
        return f"plugin {name!r} ({package} {version})"

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
