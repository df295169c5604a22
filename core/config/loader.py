"""Reading ``relay.conf``: TOML, ``include = [globs]``, ``${ENV}`` and ``${section.key}``.

The result is a plain nested dict plus a :class:`Sources` map that remembers which file set each
key, so that validation errors can say ``file:line: [section] key: problem``.
"""

from __future__ import annotations

import glob
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_INCLUDE_DEPTH = 8
_REF = re.compile(r"\$\$|\$\{([^}]*)\}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ConfigError(ValueError):
    """A configuration problem, phrased for the operator (file, line and key when known)."""


@dataclass
class Sources:
    """Which file set each dotted key (``"smtp.port"``), for error messages."""

    files: dict[str, Path] = field(default_factory=dict)
    #: dotted keys whose value came from the command line (they override the file's)
    command_line: set[str] = field(default_factory=set)

    def mark_command_line(self, overrides: dict[str, Any], prefix: str = "") -> None:
        """Record that every key in ``overrides`` was set on the command line."""
        for key, value in overrides.items():
            if isinstance(value, dict):
                self.mark_command_line(value, prefix=f"{prefix}{key}.")
            else:
                self.command_line.add(f"{prefix}{key}")

    def where(self, dotted: str) -> str:
        """``"relay.conf:12"`` for a key set in a file, ``"command line"`` for an option, ``""`` for
        defaults."""
        if dotted in self.command_line:
            return "command line"
        path = self.files.get(dotted)
        if path is None:
            # A whole section may have come from one file even if this key did not exist.
            section = dotted.rpartition(".")[0]
            path = self.files.get(section)
            if path is None:
                return ""
            return str(path)
        line = find_line(path, dotted)
        return f"{path}:{line}" if line else str(path)

    def describe(self, dotted: str) -> str:
        """``"relay.conf:12: [smtp] port"``: the prefix of every validation message."""
        section, _, key = dotted.rpartition(".")
        where = self.where(dotted)
        name = f"[{section}] {key}" if section else key
        return f"{where}: {name}" if where else name


def find_line(path: Path, dotted: str) -> int:
    """Best-effort line number of ``dotted`` in a TOML file (0 when not found)."""
    section, _, key = dotted.rpartition(".")
    try:
        # TOML lines end at LF only (str.splitlines would also split at U+2028 and friends).
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError):
        return 0
    current = ""
    key_re = re.compile(rf"""^\s*(?:{re.escape(key)}|"{re.escape(key)}"|'{re.escape(key)}')\s*=""")
    for i, line in enumerate(lines, 1):
        m = re.match(r"^\s*\[\s*([^\[\]]+?)\s*\]\s*(?:#.*)?$", line)
        if m:
            current = m.group(1).replace('"', "").replace(" ", "")
            if current == dotted:  # the key names a whole table: its header line
                return i
            continue
        if current == section and key_re.match(line):
            return i
    return 0


def read_text_file(path: str | os.PathLike[str], what: str) -> str:
    """A UTF-8 text file an operator wrote (``what``: "options file", "secrets file"), with
    readable errors; NUL characters are refused."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read {what}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: {what} is not UTF-8 text") from None
    if "\0" in text:
        raise ConfigError(f"{path}: {what} contains a NUL character")
    return text


def load_file(path: str | os.PathLike[str]) -> tuple[dict[str, Any], Sources]:
    """Load ``path`` with its includes (merged after it, in sorted glob order), then interpolate."""
    sources = Sources()
    data = _load_with_includes(Path(path), sources, depth=0, seen=())
    return interpolate(data, sources), sources


def _load_with_includes(path: Path, sources: Sources, depth: int, seen: tuple[Path, ...]) -> dict[str, Any]:
    path = path.expanduser()
    resolved = path.resolve()
    if resolved in seen:
        chain = " -> ".join(str(p) for p in (*seen, resolved))
        raise ConfigError(f"{path}: include loop: {chain}")
    if depth > MAX_INCLUDE_DEPTH:
        raise ConfigError(f"{path}: includes nested deeper than {MAX_INCLUDE_DEPTH}")
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: TOML syntax error: {e}") from None
    includes = data.pop("include", [])
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ConfigError(f"{path}:{find_line(path, 'include')}: include: expected a list of file patterns")
    _record(data, path, sources, prefix="")
    for pattern in includes:
        full = pattern if os.path.isabs(pattern) else str(path.parent / pattern)
        matches = sorted(glob.glob(os.path.expanduser(full)))
        if not matches and not glob.has_magic(pattern):
            raise ConfigError(f"{path}: include {pattern!r}: no such file")
        for match in matches:
            included = _load_with_includes(Path(match), sources, depth + 1, (*seen, resolved))
            deep_merge(data, included)
    return data


def _record(data: dict[str, Any], path: Path, sources: Sources, prefix: str) -> None:
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        sources.files[dotted] = path
        if isinstance(value, dict):
            _record(value, path, sources, prefix=dotted + ".")


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """Merge ``overlay`` into ``base`` in place: tables merge, everything else is replaced."""
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_merge(base[key], value)
        else:
            base[key] = value
    return base


def interpolate(data: dict[str, Any], sources: Sources | None = None) -> dict[str, Any]:
    """Replace ``${VAR}`` (environment; ``${VAR:-default}`` when unset or empty) and
    ``${section.key}`` in strings.

    ``$$`` is a literal dollar sign. An unset variable or a missing key is an error naming where
    the reference is.
    """
    sources = sources or Sources()

    def lookup(dotted: str, stack: tuple[str, ...]) -> Any:
        node: Any = data
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                raise KeyError(dotted)
            node = node[part]
        if isinstance(node, str):
            return expand(node, dotted, stack)
        return node

    def expand(text: str, dotted: str, stack: tuple[str, ...]) -> str:
        if dotted in stack:
            raise ConfigError(f"{sources.describe(dotted)}: interpolation loop: "
                              + " -> ".join((*stack, dotted)))

        def repl(m: re.Match[str]) -> str:
            if m.group(0) == "$$":
                return "$"
            ref = m.group(1).strip()
            name, sep, default = ref.partition(":-")
            if "." in name:
                try:
                    value = lookup(name, (*stack, dotted))
                except KeyError:
                    raise ConfigError(f"{sources.describe(dotted)}: ${{{ref}}} refers to a key "
                                      "that is not set") from None
                if isinstance(value, (dict, list)):
                    raise ConfigError(f"{sources.describe(dotted)}: ${{{ref}}} is not a single value")
                return str(value).lower() if isinstance(value, bool) else str(value)
            if not _ENV_NAME.fullmatch(name):
                raise ConfigError(f"{sources.describe(dotted)}: bad reference ${{{ref}}}")
            value = os.environ.get(name)
            if sep and not value:  # as in the shell: the default also replaces an empty value
                return default
            if value is not None:
                return value
            raise ConfigError(f"{sources.describe(dotted)}: environment variable {name} is not set "
                              f"(write ${{{name}:-default}} to give a default)")

        return _REF.sub(repl, text)

    def walk(node: Any, dotted: str) -> Any:
        if isinstance(node, dict):
            return {k: walk(v, f"{dotted}.{k}" if dotted else k) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, dotted) for v in node]
        if isinstance(node, str):
            return expand(node, dotted, ())
        return node

    return walk(data, "")
