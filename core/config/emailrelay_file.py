"""E-MailRelay's configuration file: one option per line without the dashes.

``name value`` (the value is the rest of the line; one pair of surrounding double quotes is
removed), a bare ``name`` for a flag (or ``name yes`` / ``name no``), ``#`` comment lines.
The file turns into command-line arguments placed *before* the real ones, so options given on
the command line win.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Container

from .loader import ConfigError, read_text_file

_YES = {"y", "yes", "t", "true", "1", "on"}
_NO = {"n", "no", "f", "false", "0", "off"}


def read_options_file(path: str | Path, flags: Container[str], known: Container[str],
                      optional: Container[str] = ()) -> list[str]:
    """Arguments equivalent to the file: ``["--port", "25", "--log", ...]``.

    ``flags`` names the options that take no value; ``optional`` those that may have one
    (``anonymous`` or ``anonymous server``); ``known`` every option the relay has.
    """
    path = Path(path)
    text = read_text_file(path, "options file")
    args: list[str] = []
    # Lines end at LF (CR LF too): str.splitlines would also split inside a value at U+2028 etc.
    for lineno, line in enumerate(text.split("\n"), 1):
        line = line.rstrip(" \t\r")
        stripped = line.lstrip()
        if not stripped or stripped.startswith("#"):
            continue
        m = re.match(r"([A-Za-z0-9][A-Za-z0-9-]*)(?:[ \t=]+(.*))?$", stripped)
        if not m:
            raise ConfigError(f"{path}:{lineno}: not an option line: {stripped[:60]!r}")
        name, value = m.group(1), m.group(2)
        if name not in known:
            raise ConfigError(f"{path}:{lineno}: unknown option {name!r}")
        if value is not None and len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        if name in optional:
            args.append(f"--{name}" if value in (None, "") else f"--{name}={value}")
            continue
        if name in flags:
            if value is None or value.lower() in _YES:
                args.append(f"--{name}")
            elif value.lower() not in _NO:
                raise ConfigError(f"{path}:{lineno}: option {name!r} takes no value (or yes/no)")
            continue
        if value is None or value == "":
            raise ConfigError(f"{path}:{lineno}: option {name!r} needs a value")
        args += [f"--{name}", value]
    return args
