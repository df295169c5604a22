"""``GET/PUT /api/v1/config``: the relay.conf the daemon was started with, edited safely.

A new text is validated exactly as ``relay check-config`` does (the same loader, with the plugins
it enables), from a hidden file beside relay.conf so that relative ``include`` patterns resolve
the same way; errors name relay.conf, its line and key. Only then is the old file kept as
``relay.conf.bak`` and the new one written atomically (a file beside it, flushed, renamed over
it, the directory flushed), with the old file's mode and owner.

What takes effect when: the daemon reads relay.conf only at start-up (SIGHUP re-reads the TLS
certificate files, not the configuration), so every changed key needs a restart; the response
lists them. Blocking: runs in the HTTP server's worker threads.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import threading
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mailrelay.config import ConfigError
from mailrelay.plugin_host import PluginError


_saving = threading.Lock()  # two admins saving at once: one after the other, If-Match decides


class ConfigConflict(Exception):
    """The file changed since the caller read it (``If-Match`` did not match)."""


@dataclass(frozen=True)
class ConfigFile:
    path: Path
    text: str
    etag: str


def etag_of(data: bytes) -> str:
    return '"' + hashlib.sha256(data).hexdigest()[:32] + '"'


def read(path: str | os.PathLike[str]) -> ConfigFile:
    """The file's text and its ETag; OSError if unreadable, ConfigError if not UTF-8."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    return ConfigFile(Path(path), text, etag_of(data))


def validate(path: str | os.PathLike[str], text: str) -> list[str]:
    """Check ``text`` as relay.conf at ``path``; return the loader's warnings, or raise
    :class:`ConfigError` with the problem (phrased for relay.conf, not the scratch file)."""
    from mailrelay.cli import load  # the loader `relay check-config` uses

    path = Path(path)
    if "\0" in text:
        raise ConfigError(f"{path}: contains a NUL character")
    scratch = path.with_name(f".{path.name}.check-{secrets.token_hex(6)}")
    try:
        _write(scratch, text.encode("utf-8"), mode=0o600, durable=False)
        try:
            _, _, warnings = load(str(scratch), {})
        except (ConfigError, PluginError) as e:
            raise ConfigError(str(e).replace(str(scratch), str(path)).replace(scratch.name, path.name)) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            scratch.unlink()
    return [w.replace(str(scratch), str(path)) for w in warnings]


def save(path: str | os.PathLike[str], text: str, if_match: str | None = None) -> Path:
    """Keep the current file as ``<name>.bak`` and write ``text`` in its place; return the
    backup's path. Raises :class:`ConfigConflict` when ``if_match`` is not the current ETag."""
    target = Path(path).resolve()  # a symlinked relay.conf: write the file it points to
    with _saving:
        current = target.read_bytes()
        if if_match and if_match.strip().strip('"') not in (etag_of(current).strip('"'), "*"):
            raise ConfigConflict(f"{path} changed since it was read; reload it and edit again")
        st = target.stat()
        backup = target.with_name(target.name + ".bak")
        _write(backup, current, mode=st.st_mode & 0o7777, owner=(st.st_uid, st.st_gid))
        _write(target, text.encode("utf-8"), mode=st.st_mode & 0o7777, owner=(st.st_uid, st.st_gid))
    return backup


def changed_keys(old_text: str, new_text: str) -> list[str]:
    """Dotted keys (``smtp.port``) that differ between two versions of the file itself."""
    def flat(text: str) -> dict[str, Any]:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError:
            return {}
        out: dict[str, Any] = {}

        def walk(node: Any, prefix: str) -> None:
            if isinstance(node, dict) and node:
                for key, value in node.items():
                    walk(value, f"{prefix}{key}.")
            else:
                out[prefix[:-1]] = node
        walk(data, "")
        return out

    old, new = flat(old_text), flat(new_text)
    return sorted(k for k in old.keys() | new.keys() if old.get(k, _MISSING) != new.get(k, _MISSING))


_MISSING = object()


def _write(path: Path, data: bytes, *, mode: int, owner: tuple[int, int] | None = None,
           durable: bool = True) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(fd)
        os.fchmod(fd, mode)
        if owner is not None and os.geteuid() == 0:
            os.fchown(fd, *owner)
    except BaseException:
        os.close(fd)
        tmp.unlink()
        raise
    os.close(fd)
    os.replace(tmp, path)
    if durable:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
