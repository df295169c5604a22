"""``relay token``: create, list and revoke the admin API's tokens."""

from __future__ import annotations

import json
import time
from typing import Any, Callable

import click


from .settings import AdminSettings
from .tokens import TokenError, TokenStore


def _options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("-f", "--file", "file", metavar="FILE", default=None,
                     help="tokens file (default: [admin] tokens_file, else <spool dir>/admin-tokens.json)")(f)
    f = click.option("-s", "--spool-dir", "spool_dir", metavar="DIR", default=None,
                     help="spool directory (default: from relay.conf)")(f)
    return click.option("-c", "--config", "config", metavar="FILE", default=None,
                        help="relay.conf (default: $MAILRELAY_CONFIG, else /etc/mailrelay/relay.conf)")(f)


def _store(ctx: click.Context, config: str | None, spool_dir: str | None, file: str | None) -> TokenStore:
    """The tokens file the daemon reads, found from the same configuration."""
    if file:
        return TokenStore(file)
    from mailrelay.cli import command_settings  # imported late: the CLI imports this plugin
    settings = command_settings(ctx, config, spool_dir)
    admin: AdminSettings = settings.extra.get("admin") or AdminSettings()
    return TokenStore(admin.tokens_path(settings.spool.dir))


@click.group("token")
def token_group() -> None:
    """Manage the admin API's tokens (Authorization: Bearer TOKEN).

    Only a hash of each token is stored; the token itself is shown once, by `create`. A running
    relay sees a new or revoked token at once.
    """


@token_group.command("create")
@_options
@click.argument("name")
@click.pass_context
def create_command(ctx: click.Context, config: str | None, spool_dir: str | None, file: str | None,
                   name: str) -> None:
    """Create a token called NAME and print it (the only time it is shown)."""
    store = _store(ctx, config, spool_dir, file)
    try:
        token = store.create(name)
    except (TokenError, OSError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"token {name!r} created in {store.path}; it is shown only now:", err=True)
    click.echo(token)


@token_group.command("list")
@_options
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_context
def list_command(ctx: click.Context, config: str | None, spool_dir: str | None, file: str | None,
                 as_json: bool) -> None:
    """List the tokens: name, when created, and their first characters."""
    store = _store(ctx, config, spool_dir, file)
    try:
        records = store.records()
    except TokenError as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps([{"name": r.name, "created": r.created, "hint": r.hint} for r in records], indent=2))
        return
    if not records:
        click.echo(f"no tokens in {store.path}")
        return
    width = max(len(r.name) for r in records)
    for r in records:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.created))
        click.echo(f"{r.name:<{width}}  {created}  {r.hint}...")


@token_group.command("revoke")
@_options
@click.argument("name")
@click.pass_context
def revoke_command(ctx: click.Context, config: str | None, spool_dir: str | None, file: str | None,
                   name: str) -> None:
    """Revoke the token called NAME: it stops working at once."""
    store = _store(ctx, config, spool_dir, file)
    try:
        store.revoke(name)
    except (TokenError, OSError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"token {name!r} revoked")
