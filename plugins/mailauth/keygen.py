"""``relay dkim keygen``: a new signing key, written safely, and the DNS record to publish."""

from __future__ import annotations

import os
from pathlib import Path

import click

from mailrelay.config.loader import ConfigError

from . import keys
from .settings import DNS_NAME, normalise_domain


@click.group("dkim")
def dkim_cli() -> None:
    """DKIM signing keys (the dkim-sign plugin)."""


@dkim_cli.command("keygen")
@click.option("--selector", "-s", required=True, help="the selector: the key's record is SELECTOR._domainkey.DOMAIN")
@click.option("--domain", "-d", required=True, help="the signing domain (the From: domain of your mail)")
@click.option("--type", "kind", type=click.Choice(["rsa", "ed25519"]), default="rsa", show_default=True,
              help="rsa is verified everywhere; ed25519 (RFC 8463) is short, as a second signature")
@click.option("--bits", type=int, default=2048, show_default=True, help="RSA key size (1024-4096)")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="directory for the key file (default: the current directory)")
def keygen(selector: str, domain: str, kind: str, bits: int, out: Path | None) -> None:
    """Write a new private key (PEM, mode 0600) and print the DNS TXT record to publish.

    An existing key file is never replaced: its public half may be in DNS already.
    """
    if not DNS_NAME.fullmatch(selector):
        raise click.BadParameter(f"{selector!r} is not a DNS label (letters, digits, '-', '_')", param_hint="--selector")
    try:
        domain = normalise_domain(domain, "--domain")
    except ConfigError as e:
        raise click.BadParameter(str(e).split(": ", 1)[-1], param_hint="--domain") from None
    if kind == "ed25519" and bits != 2048:
        raise click.BadParameter("Ed25519 keys have no size to choose", param_hint="--bits")
    try:
        private = keys.generate(kind, bits)  # type: ignore[arg-type]
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--bits") from None
    directory = (out or Path.cwd()).absolute()
    path = directory / f"dkim-{domain}-{selector}.pem"
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        keys.write_private(path, keys.pem(private))
    except FileExistsError:
        raise click.ClickException(f"{path} exists; not replacing a key that may be published "
                                   "(choose another --selector, or remove the file first)") from None
    except OSError as e:
        raise click.ClickException(f"cannot write {path}: {e.strerror}") from None
    record = keys.txt_record(private)
    name = f"{selector}._domainkey.{domain}"
    size = f"RSA {bits} bits" if kind == "rsa" else "Ed25519"
    prefix = "" if kind == "rsa" else "ed25519_"
    click.echo(f"wrote {path} ({size}, mode {os.stat(path).st_mode & 0o777:04o})")
    click.echo("publish this DNS record (zone-file form; the value is split into strings of 255 octets):")
    click.echo(keys.zone_line(name, record))
    click.echo(f"record name: {name}")
    click.echo(f"record value: {record}")
    click.echo("then sign with it (relay.conf):")
    click.echo(f'[dkim]\ndomain = "{domain}"\n{prefix}selector = "{selector}"\n{prefix}key = "{path}"')
