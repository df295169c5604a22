"""Configuration: find the file, merge the command line over it, validate into typed settings.

Precedence, lowest first: built-in defaults, ``relay.conf`` (with its includes), an E-MailRelay
options file, the command line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from .loader import ConfigError, Sources, deep_merge, load_file
from .settings import _YES, CORE_SECTIONS, Settings, build_settings

SYSTEM_CONFIG = "/etc/mailrelay/relay.conf"

# A configuration section that only one built-in plugin reads enables that plugin (in this order:
# the address verifier runs before relay control, which trusts its "local").
SECTION_PLUGINS = {"forward": "forward", "filters": "filters", "dnsbl": "dnsbl", "verifier": "verifier", "relay": "relay-control",
                   "webhooks": "webhooks", "metrics": "metrics",
                   "admin": "admin",
                   "pickup": "pickup",
                   "dkim": "dkim-sign", "arc": "dkim-sign", "mailauth": "mailauth", "spf": "mailauth",
                   "dmarc": "mailauth"}
# Serving remote clients without relay control would make an open relay: they come together.
REMOTE_CLIENTS_PLUGIN = "relay-control"

__all__ = ["ConfigError", "Settings", "Sources", "find_config_file", "load_settings", "SYSTEM_CONFIG"]


def _is_true(value: Any) -> bool:
    """A raw boolean as validation will read it (``true``, ``"yes"``, ``"on"``...)."""
    return value is True or (isinstance(value, str) and value.strip().lower() in _YES)


def find_config_file(explicit: str | None) -> str | None:
    """``--config`` if given, else ``$MAILRELAY_CONFIG``, else the system file when it exists."""
    if explicit:
        return explicit
    env = os.environ.get("MAILRELAY_CONFIG")
    if env:
        return env
    return SYSTEM_CONFIG if Path(SYSTEM_CONFIG).exists() else None


def load_settings(config_file: str | None, overrides: dict[str, Any],
                  enable_plugins: Callable[[list[str]], dict[str, type]],
                  implied_plugins: list[str] | None = None) -> tuple[Settings, list[str]]:
    """Load and validate everything.

    ``overrides`` is the raw form of the command-line options (applied over the file);
    ``enable_plugins`` enables the named plugins and returns their config schemas, so that their
    sections are validated too; ``implied_plugins`` (needed by command-line options such as
    ``--forward-to``) are enabled after the configured ones.
    """
    raw: dict[str, Any] = {}
    sources = Sources()
    if config_file:
        raw, sources = load_file(config_file)
    deep_merge(raw, overrides)
    sources.mark_command_line(overrides)
    plugin_names = raw.get("plugins", {}).get("enable", []) if isinstance(raw.get("plugins"), dict) else []
    if isinstance(plugin_names, str):
        plugin_names = [p.strip() for p in plugin_names.split(",") if p.strip()]
    if not isinstance(plugin_names, list):
        raise ConfigError(f"{sources.describe('plugins.enable')}: expected a list of plugin names")
    names = [str(n) for n in plugin_names]
    names += [p for p in implied_plugins or [] if p not in names]
    names += [p for section, p in SECTION_PLUGINS.items() if raw.get(section) and p not in names]
    smtp = raw.get("smtp") if isinstance(raw.get("smtp"), dict) else {}
    if _is_true(smtp.get("remote_clients")) and REMOTE_CLIENTS_PLUGIN not in names:
        names.append(REMOTE_CLIENTS_PLUGIN)
    schemas = enable_plugins(names)
    clash = set(schemas) & set(CORE_SECTIONS)
    if clash:
        raise ConfigError(f"a plugin declares the core section [{', '.join(sorted(clash))}]")
    warnings: list[str] = []
    settings = build_settings(raw, sources, schemas, warnings)
    settings.config_file = config_file or ""
    return settings, warnings
