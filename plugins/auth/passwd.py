"""``relay passwd``: E-MailRelay's ``emailrelay-passwd``, plus our password-hash types.

Reads one password and prints the SECRET field of a secrets-file line:

* ``md5`` (default): what ``emailrelay-passwd`` prints, for ``server md5 NAME SECRET`` (and
  ``client md5``); ``--dotted`` gives the older dotted-decimal form;
* ``none``: the password in xtext, for ``plain`` lines (``emailrelay-passwd --hash=none``);
* ``bcrypt``, ``argon2``, ``scrypt``: a salted hash for ``server bcrypt|argon2|scrypt NAME SECRET``.

As ``emailrelay-passwd`` does, it reads the first line of standard input and trims spaces, tabs
and line ends from both ends (``--base64`` takes the password base64-encoded, so it may have
them). On a terminal it prompts twice without echo instead. ``--password`` is accepted for
compatibility, but puts the password in the process table and the shell history.
"""

from __future__ import annotations

import base64
import binascii
import getpass
import sys

import click

from mailrelay.cram_md5 import hashed_secret

from . import hashes

TYPES = ("md5", "none", *hashes.HASH_KINDS)
_TRIM = b" \t\r\n"


def xtext(data: bytes) -> str:
    """RFC 3461 xtext of raw bytes, as E-MailRelay writes it (``+XX`` outside ``!``..``~``, and for
    ``+`` and ``=``)."""
    return "".join(chr(b) if 0x21 <= b <= 0x7E and b not in b"+=" else f"+{b:02X}" for b in data)


def _read_password(given: str | None) -> bytes:
    if given is not None:
        return given.encode("utf-8")
    if sys.stdin.isatty():
        first = getpass.getpass("Password: ")
        if getpass.getpass("Password (again): ") != first:
            raise click.ClickException("the passwords differ")
        return first.encode("utf-8").strip(_TRIM)
    return sys.stdin.buffer.readline().strip(_TRIM)


def encode_password(password: bytes, kind: str, *, dotted: bool = False) -> str:
    """The secrets-file field for ``password`` as type ``kind`` (ValueError if impossible)."""
    if dotted and kind != "md5":
        raise ValueError("--dotted only works for md5")
    if kind == "md5":
        return str(hashed_secret(password, dotted=dotted))
    if kind == "none":
        return xtext(password)
    return hashes.make_hash(kind, password)


@click.command("passwd")
@click.option("-H", "--hash", "--type", "kind", type=click.Choice(TYPES, case_sensitive=False),
              default="md5", show_default=True,
              help="md5: emailrelay-passwd's CRAM-MD5 secret; none: xtext; bcrypt, argon2, scrypt: a "
                   "password hash for 'server bcrypt|argon2|scrypt' lines")
@click.option("-b", "--base64", "is_base64", is_flag=True, help="the password is given base64-encoded")
@click.option("-d", "--dotted", is_flag=True, help="md5 in the older dotted-decimal form")
@click.option("-p", "--password", default=None, metavar="PWD",
              help="the password (visible to other local users: prefer standard input)")
def passwd_command(kind: str, is_base64: bool, dotted: bool, password: str | None) -> None:
    """Print the secrets-file form of a password read from standard input (emailrelay-passwd)."""
    raw = _read_password(password)
    if not raw:
        raise click.ClickException("invalid password")
    if is_base64:
        try:
            raw = base64.b64decode(raw, validate=True)
        except binascii.Error:
            raise click.ClickException("the password is not valid base64") from None
        if not raw:
            raise click.ClickException("invalid password")
    try:
        click.echo(encode_password(raw, kind.lower(), dotted=dotted))
    except (ValueError, hashes.MissingLibrary) as e:
        raise click.ClickException(str(e)) from None
