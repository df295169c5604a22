"""The ``relay`` command: the daemon (E-MailRelay's options) and its subcommands.

``relay [OPTIONS] [OPTIONS-FILE]`` runs the daemon; ``relay plugins`` and ``relay check-config``
inspect. Every form reads ``relay.conf`` from ``--config/-c``, ``$MAILRELAY_CONFIG`` or
``/etc/mailrelay/relay.conf``; command-line options override it.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

from .. import __version__, daemon
from ..config import ConfigError, find_config_file, load_settings
from ..config.emailrelay_file import read_options_file
from ..config.settings import Settings
from ..net import BindError
from ..plugin_host import HookCaller, PluginError, PluginHost
from .options import OPTIONS, apply_options


def _schemas(host: PluginHost) -> dict[str, type]:
    schemas: dict[str, type] = {}
    for result in host.pm.hook.relay_config_schema():
        if result:
            schemas.update(result)
    return schemas


def load(config: str | None, given: dict[str, Any]) -> tuple[Settings, PluginHost, list[str]]:
    """Settings and the plugin host with the enabled plugins registered."""
    host = PluginHost()
    overrides: dict[str, Any] = {}
    implied = apply_options(overrides, given)

    def enable(names: list[str]) -> dict[str, type]:
        host.enable(names)
        return _schemas(host)

    settings, warnings = load_settings(find_config_file(config), overrides, enable, implied)
    return settings, host, warnings


def _daemon_options(f: Any) -> Any:
    for option in reversed(OPTIONS):
        names = [f"--{option.long}"] + ([f"-{option.short}"] if option.short else [])
        kwargs: dict[str, Any] = {"help": option.help}
        if option.kind == "flag":
            kwargs["is_flag"] = True
        elif option.kind == "count":
            kwargs["count"] = True
        elif option.kind == "multi":
            kwargs.update(multiple=True, metavar=option.metavar)
        elif option.kind == "optional":  # --anonymous or --anonymous=server,content
            kwargs.update(is_flag=False, flag_value="all", metavar=option.metavar)
        else:
            kwargs["metavar"] = option.metavar
        f = click.option(*names, option.dest, **kwargs)(f)
    return f


CONFIG_OPTION = click.option("-c", "--config", "config", metavar="FILE", default=None,
                             help="relay.conf (default: $MAILRELAY_CONFIG, else /etc/mailrelay/relay.conf)")


class RelayGroup(click.Group):
    """The ``relay`` group: core subcommands, plus those that installed plugins add (``relay_cli``).

    Plugin subcommands are looked up only when a name is not a core one (or for ``--help``), so
    running the daemon never imports plugins it was not asked to enable.
    """

    _plugin_commands: dict[str, click.Command] | None = None

    def plugin_commands(self) -> dict[str, click.Command]:
        if self._plugin_commands is None:
            collected = click.Group("plugins")
            host = PluginHost()
            for name in sorted(host.available):
                try:
                    host.enable([name])
                except PluginError as e:  # a broken third-party plugin must not break the CLI
                    click.echo(f"relay: warning: {e}", err=True)
            host.pm.hook.relay_cli(cli=collected)
            self._plugin_commands = {n: c for n, c in collected.commands.items() if n not in self.commands}
        return self._plugin_commands

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return super().get_command(ctx, cmd_name) or self.plugin_commands().get(cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.plugin_commands()})


@click.group(cls=RelayGroup, invoke_without_command=True,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@CONFIG_OPTION
@_daemon_options
@click.version_option(__version__, "-V", "--version", prog_name="mailrelay")
@click.pass_context
def cli(ctx: click.Context, config: str | None, **given: Any) -> None:
    """mailrelay: a plugin-host SMTP store-and-forward relay.

    With no subcommand, runs the relay (in the background unless --no-daemon). An E-MailRelay
    options file (one option per line, without the dashes) may be given as the last argument.
    """
    ctx.obj = {"config": config, "given": given}
    if ctx.invoked_subcommand is not None:
        return
    try:
        settings, host, warnings = load(config, given)
    except (ConfigError, PluginError) as e:
        raise click.ClickException(str(e)) from None
    for warning in warnings:
        click.echo(f"relay: warning: {warning}", err=True)
    ctx.exit(daemon.run(settings, host))


def _sub_load(ctx: click.Context, config: str | None, spool_dir: str | None = None
              ) -> tuple[Settings, PluginHost, list[str]]:
    parent = ctx.find_object(dict) or {}
    given = dict(parent.get("given", {}))
    if spool_dir:
        given["spool_dir"] = spool_dir
    try:
        return load(config or parent.get("config"), given)
    except (ConfigError, PluginError) as e:
        raise click.ClickException(str(e)) from None


def command_settings(ctx: click.Context, config: str | None, spool_dir: str | None = None) -> Settings:
    """The daemon's settings for a subcommand (``relay queue``, ``relay token``, ...): the same
    file, environment and options, so the subcommand finds the spool the daemon uses. Errors
    become a readable ``click`` error."""
    return _sub_load(ctx, config, spool_dir)[0]


@cli.command("plugins")
@CONFIG_OPTION
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_context
def plugins_command(ctx: click.Context, config: str | None, as_json: bool) -> None:
    """List discovered plugins: name, version, package, enabled, hooks."""
    _, host, _ = _sub_load(ctx, config)
    rows = host.info()
    if as_json:
        click.echo(json.dumps([{"name": r.name, "version": r.version, "package": r.package,
                                "value": r.value, "enabled": r.enabled, "builtin": r.builtin,
                                "hooks": list(r.hooks)} for r in rows], indent=2))
        return
    if not rows:
        click.echo("no plugins installed")
        return
    width = max(len(r.name) for r in rows)
    pkg_width = max(len(f"{r.package} {r.version}") for r in rows)
    for r in rows:
        hooks = ", ".join(r.hooks) if r.enabled else "-"
        click.echo(f"{r.name:<{width}}  {'enabled ' if r.enabled else 'disabled'}  "
                   f"{r.package + ' ' + r.version:<{pkg_width}}  {hooks}")


@cli.command("check-config")
@click.argument("file", required=False)
@click.pass_context
def check_config_command(ctx: click.Context, file: str | None) -> None:
    """Validate a relay.conf (and the plugins it enables); exit 1 with the problem if invalid."""
    path = file or (ctx.find_object(dict) or {}).get("config") or find_config_file(None)
    if not path:
        raise click.ClickException("no configuration file given (and no $MAILRELAY_CONFIG or "
                                   "/etc/mailrelay/relay.conf)")
    settings, host, warnings = _sub_load(ctx, path)
    try:
        host.pm.hook.relay_check_config(settings=settings, hooks=HookCaller(host, timeout=0))
    except ConfigError as e:
        raise click.ClickException(f"{path}: {e}") from None
    for warning in warnings:
        click.echo(f"relay: warning: {warning}", err=True)  # the warning names the file itself
    click.echo(f"{path}: OK (plugins: {', '.join(host.order) or 'none'}; spool {settings.spool.dir}; "
               f"SMTP port {settings.smtp.port})")


from .queue import queue_group  # noqa: E402  (it uses load and CONFIG_OPTION from above)
cli.add_command(queue_group)
from .submit import submit_command  # noqa: E402  (likewise)
cli.add_command(submit_command)
from .newplugin import new_plugin_command  # noqa: E402
cli.add_command(new_plugin_command)


# ---------------------------------------------------------------- E-MailRelay options file
def expand_options_file(argv: list[str]) -> list[str]:
    """Replace a trailing E-MailRelay options file argument with the options it holds.

    The file's options go first so that options on the command line win.
    """
    takes_value = {f"--{o.long}" for o in OPTIONS if o.kind in ("value", "multi")} | {"--config"}
    short_value = {o.short for o in OPTIONS if o.short and o.kind in ("value", "multi")} | {"c"}
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--":
            return argv
        if token.startswith("--"):
            i += 1 if "=" in token or token not in takes_value else 2
            continue
        if token.startswith("-") and len(token) > 1:
            for j, ch in enumerate(token[1:], 1):
                if ch in short_value:
                    i += 1 if j < len(token) - 1 else 2
                    break
            else:
                i += 1
            continue
        if token in cli.commands:
            return argv
        if not os.path.exists(token) and token in cli.plugin_commands():
            return argv
        flags = {o.long for o in OPTIONS if o.kind in ("flag", "count")}
        optional = {o.long for o in OPTIONS if o.kind == "optional"}
        known = {o.long for o in OPTIONS} | {"config"}
        try:
            file_args = read_options_file(token, flags, known, optional)
        except ConfigError as e:
            raise click.ClickException(str(e)) from None
        return file_args + argv[:i] + argv[i + 1:]
    return argv


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        args = expand_options_file(args)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    cli.main(args=args, prog_name="relay")


__all__ = ["cli", "main", "BindError"]
