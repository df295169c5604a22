"""docs/ stays true: the option table of docs/migrating-from-emailrelay.md is checked against the
code (core/cli/options.py and the click command) and against E-MailRelay 2.6's list of options.

To refresh the generated columns after an option changes: ``python tests/test_docs.py`` prints each
row's first four cells; the notes (the last cell) are written by hand.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import click

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "migrating-from-emailrelay.md"

#: E-MailRelay 2.6's options (doc/reference.md) and their short forms; "s" for --delivery-dir is
#: theirs too (it clashes with --spool-dir there).
EMAILRELAY_OPTIONS: dict[str, str] = {
    "address-verifier": "", "admin": "a", "admin-terminate": "Q", "anonymous": "A", "as-client": "q",
    "as-proxy": "y", "as-server": "d", "client-auth": "C", "client-auth-config": "", "client-filter": "Y",
    "client-interface": "6", "client-smtp-config": "c", "client-tls": "j", "client-tls-certificate": "",
    "client-tls-connection": "b", "client-tls-required": "", "client-tls-server-name": "",
    "client-tls-verify": "", "client-tls-verify-name": "", "close-stderr": "e", "connection-timeout": "U",
    "debug": "g", "delivery-dir": "s", "dnsbl": "", "domain": "D", "dont-serve": "x", "filter": "z",
    "filter-timeout": "W", "forward": "f", "forward-on-disconnect": "1", "forward-to": "o",
    "forward-to-all": "", "forward-to-some": "", "help": "h", "hidden": "H", "idle-timeout": "",
    "immediate": "m", "interface": "I", "localedir": "", "log": "l", "log-address": "", "log-file": "N",
    "log-format": "", "log-time": "L", "no-daemon": "t", "no-smtp": "X", "no-syslog": "n", "pid-file": "i",
    "poll": "O", "pop": "B", "pop-auth": "F", "pop-by-name": "J", "pop-no-delete": "G", "pop-port": "E",
    "port": "p", "prompt-timeout": "w", "remote-clients": "r", "response-timeout": "T", "server-auth": "S",
    "server-auth-config": "", "server-smtp-config": "Z", "server-tls": "K", "server-tls-certificate": "",
    "server-tls-connection": "", "server-tls-required": "", "server-tls-verify": "", "show": "",
    "size": "M", "spool-dir": "s", "syslog": "k", "tls-config": "9", "user": "u", "verbose": "v",
    "version": "V",
}
#: Sample values for options whose apply function checks its value.
SAMPLES: dict[str, Any] = {
    "server-smtp-config": ("pipelining", "smtputf8", "smtputf8strict", "strictparsing"),
    "client-smtp-config": ("pipelining",), "tls-config": ("tlsv1.3",), "log-format": ("time",),
    "server-tls-certificate": ("key.pem", "cert.pem"), "client-tls-certificate": ("key.pem", "cert.pem"),
    "anonymous": True, "syslog": "local0", "verbose": 1, "interface": ("127.0.0.1",), "filter": ("exit:0",),
    "client-filter": ("exit:0",), "plugins": ("eventlog",),
}
NOT_SUPPORTED = "not supported"


def click_options() -> dict[str, click.Option]:
    """The top-level `relay` command's options by long name (help and version included)."""
    from mailrelay.cli import cli
    found = {}
    context = click.Context(cli, **(cli.context_settings or {}))  # help_option_names: -h, --help
    for param in [*cli.params, cli.get_help_option(context)]:
        if isinstance(param, click.Option):
            for opt in param.opts:
                if opt.startswith("--"):
                    found[opt[2:]] = param
    return found


def short_of(param: click.Option) -> str:
    shorts = [o[1:] for o in [*param.opts, *param.secondary_opts] if re.fullmatch(r"-[^-]", o)]
    return shorts[0] if shorts else ""


def keys_cell(long: str) -> str:
    """Where the option lands in relay.conf, found by applying it to an empty configuration."""
    from mailrelay.cli.options import BY_LONG
    option = BY_LONG.get(long)
    if option is None:
        return ""
    if option.apply is None:
        return "ignored"
    raw: dict[str, Any] = {}
    value = SAMPLES.get(long, True if option.kind == "flag" else ("x",) if option.kind == "multi" else "x")
    option.apply(raw, value)
    parts = [f"`[{section}] {', '.join(keys)}`" if keys else f"`[{section}]`" for section, keys in raw.items()]
    cell = "; ".join(parts)
    if option.plugin:
        cell += f" (`{option.plugin}` plugin)"
    return cell


def expected_rows() -> list[tuple[str, str, str, str]]:
    """(option, E-MailRelay's short form, ours, relay.conf keys) for every option of either."""
    ours = click_options()
    names = sorted(set(EMAILRELAY_OPTIONS) | set(ours))
    rows = []
    for name in names:
        theirs = EMAILRELAY_OPTIONS.get(name)
        param = ours.get(name)
        rows.append((f"`--{name}`", "(ours)" if theirs is None else f"`-{theirs}`" if theirs else "",
                     f"`-{short_of(param)}`" if param is not None and short_of(param) else "",
                     keys_cell(name) if param is not None else NOT_SUPPORTED))
    return rows


def page_rows() -> list[list[str]]:
    """The option table's rows as cells (rows start with a backquoted long option)."""
    rows = []
    for line in PAGE.read_text().splitlines():
        if line.startswith("| `--"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def test_the_option_table_lists_every_option_once_with_the_right_forms_and_keys():
    rows = page_rows()
    names = [row[0] for row in rows]
    assert len(names) == len(set(names)), "an option is listed twice"
    assert [tuple(row[:4]) for row in rows] == expected_rows()  # alphabetical, as generated


def test_every_row_has_a_note_where_behaviour_differs():
    for row in page_rows():
        assert len(row) == 5, row
        name, theirs, ours, keys, note = row
        if keys == NOT_SUPPORTED or keys == "ignored" or theirs == "(ours)" or (theirs and theirs != ours):
            assert note, f"{name}: say why it differs"


def test_the_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    assert "(docs/migrating-from-emailrelay.md)" in readme


def test_the_readme_sections_the_page_points_to_exist():
    readme_sections = set(re.findall(r"^## (.+)$", (ROOT / "README.md").read_text(), re.M))
    for section in re.findall(r"README \"([^\"]+)\"", PAGE.read_text()):
        assert section in readme_sections, f"README has no section {section!r}"


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    for row in expected_rows():
        print("| " + " | ".join(row) + " |  |")
