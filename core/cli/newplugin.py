"""``relay new-plugin NAME``: write a plugin package from the template in ``mailrelay_sdk``.

The template (``sdk/template/``) is a complete package with placeholders that keep every file
valid: ``__plugin_name__`` (the entry-point name), ``__plugin_module__``, ``__plugin_package__``,
``__plugin_section__``, ``__core_version__`` and ``__hookspec_version__``. ``dot-`` at the start
of a path becomes ``.`` (hidden files do not survive every packaging step).
"""

from __future__ import annotations

import importlib.resources
import re
from importlib.resources.abc import Traversable
from pathlib import Path

import click

from .. import __version__
from ..hookspecs import HOOKSPEC_VERSION

_NAME = re.compile(r"[a-z][a-z0-9]*(?:-[a-z0-9]+)*")


def template_values(name: str) -> dict[str, str]:
    """Placeholder values for a plugin called ``name`` (e.g. ``greylist``, ``archive-id``)."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"{name!r} is not a plugin name: use lower-case letters, digits and single "
                         "hyphens, starting with a letter (e.g. greylist, archive-id)")
    snake = name.replace("-", "_")
    major, minor = __version__.split(".")[:2]
    return {"__plugin_name__": name, "__plugin_module__": f"mailrelay_{snake}",
            "__plugin_package__": f"mailrelay-{name}", "__plugin_section__": snake,
            "__core_version__": f"{major}.{minor}", "__hookspec_version__": str(HOOKSPEC_VERSION)}


def _files(root: Traversable, prefix: str = "") -> list[tuple[str, Traversable]]:
    out: list[tuple[str, Traversable]] = []
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if entry.name == "__pycache__":
            continue
        relative = f"{prefix}{entry.name}"
        if entry.is_dir():
            out += _files(entry, relative + "/")
        else:
            out.append((relative, entry))
    return out


def write_plugin_package(name: str, parent: Path) -> Path:
    """Write the package for ``name`` into ``parent/mailrelay-NAME``; return that directory.

    Refuses to overwrite anything: the target directory must not exist yet.
    """
    values = template_values(name)
    target = parent / values["__plugin_package__"]
    if target.exists():
        raise FileExistsError(f"{target} already exists")
    template = importlib.resources.files("mailrelay_sdk") / "template"
    files = _files(template)
    if not files:
        raise FileNotFoundError("the plugin template is missing from mailrelay_sdk (a broken install?)")
    for relative, source in files:
        path = "/".join("." + part[4:] if part.startswith("dot-") else part for part in relative.split("/"))
        text = source.read_text(encoding="utf-8")
        for placeholder, value in values.items():
            path = path.replace(placeholder, value)
            text = text.replace(placeholder, value)
        out = target / path
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    return target


@click.command("new-plugin")
@click.argument("name")
@click.option("-d", "--directory", type=click.Path(file_okay=False, path_type=Path), default=Path("."),
              show_default=True, help="where to create the package directory")
def new_plugin_command(name: str, directory: Path) -> None:
    """Create a plugin package (pyproject, one hook, tests, README, CI workflow) named NAME."""
    try:
        target = write_plugin_package(name, directory)
    except (ValueError, OSError) as e:
        raise click.ClickException(str(e)) from None
    values = template_values(name)
    click.echo(f"created {target}\n"
               f"  plugin {name!r}: {values['__plugin_module__']}:Plugin "
               f"(entry point in {target / 'pyproject.toml'})\n"
               f"next: cd {target} && pip install -e '.[test]' && pytest")
