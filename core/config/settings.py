"""Typed settings: the configuration parsed and validated once, at start-up.

Each core section of ``relay.conf`` is a dataclass here; plugins declare theirs through the
``relay_config_schema`` hook and get them validated by the same code (:func:`build_section`).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from ..queue.schedule import DEFAULT_SCHEDULE, parse_duration, parse_schedule
from .loader import ConfigError, Sources


def default_spool_dir() -> str:
    """Per-user data directory: ``$XDG_DATA_HOME/mailrelay/spool`` or ``~/.local/share/...``."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "mailrelay", "spool")


@dataclass
class ServerSettings:
    """Process-wide settings."""

    domain: str = ""             # --domain; default: this host's fully qualified name
    daemon: bool = True          # --no-daemon sets false
    pid_file: str = ""           # --pid-file
    workers: int = 1             # reserved for SO_REUSEPORT scale-out
    proxy_protocol: bool = False  # SMTP connections start with a PROXY v1/v2 header (HAProxy send-proxy)
    trusted_proxies: list[str] = field(default_factory=lambda: ["127.0.0.1", "::1"])  # who may send one
    unix_socket_mode: str = "0660"  # permissions of Unix listening sockets (--interface /path), octal
    user: str = ""               # --user: started as root, run as this user once listening (E-MailRelay: "daemon")
    localedir: str = ""          # --localedir: accepted for compatibility; messages are not translated

    def effective_domain(self) -> str:
        return self.domain or socket.getfqdn()


@dataclass
class SmtpSettings:
    """The SMTP server (E-MailRelay's server options plus RFC 5321 limits)."""

    enabled: bool = True         # --no-smtp sets false
    port: int = 2525             # --port
    interface: list[str] = field(default_factory=list)  # --interface; empty: loopback (or any with remote_clients)
    remote_clients: bool = False  # --remote-clients
    anonymous: list[str] = field(default_factory=list)  # --anonymous: any of vrfy, server, content, client
    size: int = 52_428_800       # --size in octets; 0 = no limit
    idle_timeout: float = 300.0  # --idle-timeout; RFC 5321 4.5.3.2.7: at least 5 minutes
    command_timeout: float = 60.0  # a command line must be complete this long after its first octet
    min_data_rate: int = 500     # DATA gets command_timeout plus 1 s per this many octets; 0 = no limit
    max_connections: int = 1000  # sessions at once; 0 = no limit
    max_connections_per_client: int = 50  # sessions at once from one client address; 0 = no limit
    max_recipients: int = 100    # RFC 5321 4.5.3.1.8: at least 100 must be accepted
    max_hops: int = 100          # more Received: headers than this is a mail loop
    pipelining: bool = True      # --server-smtp-config keywords
    smtputf8: bool = True
    smtputf8_strict: bool = False
    strict_parsing: bool = True
    shutdown_grace: float = 10.0  # seconds in-flight commands get to finish on SIGTERM


TlsVersion = Literal["tlsv1.0", "tlsv1.1", "tlsv1.2", "tlsv1.3"]


@dataclass
class TlsSettings:
    """Server-side TLS for SMTP (E-MailRelay's ``--server-tls...`` options and ``--tls-config``)."""

    starttls: bool = False       # --server-tls: offer STARTTLS
    connection: bool = False     # --server-tls-connection: the SMTP port speaks TLS from the first byte
    required: bool = False       # --server-tls-required: only EHLO, STARTTLS, NOOP, QUIT before TLS
    certificate: str = ""        # --server-tls-certificate: PEM chain, with the key unless `key` is set
    key: str = ""                # the first of two --server-tls-certificate options
    verify: str = ""             # --server-tls-verify: CA file or directory, or "<default>"
    min_version: TlsVersion = "tlsv1.2"
    max_version: Literal["", "tlsv1.0", "tlsv1.1", "tlsv1.2", "tlsv1.3"] = ""
    config: list[str] = field(default_factory=list)  # --tls-config keywords (tlsv1.3, -tlsv1.2, ...)

    @property
    def enabled(self) -> bool:
        return self.starttls or self.connection


@dataclass
class SpoolSettings:
    dir: str = field(default_factory=default_spool_dir)  # --spool-dir
    durability: Literal["fsync", "none"] = "fsync"
    sync_method: Literal["syncfs", "fsync"] = "syncfs"


LogField = Literal["time", "unit", "address", "port", "msgid"]
SyslogFacility = Literal["mail", "user", "daemon", "local0", "local1", "local2", "local3", "local4", "local5",
                         "local6", "local7"]


@dataclass
class LogSettings:
    enabled: bool = False        # --log: info-level logging (otherwise warnings and errors only)
    verbose: int = 0             # --verbose (repeatable)
    file: str = ""               # --log-file; %d is replaced by the date (YYYYMMDD)
    syslog: bool = True          # --no-syslog sets false; used only with --log
    close_stderr: bool = False   # --close-stderr (implied by --as-server)
    time: bool = False           # --log-time
    format: Literal["text", "json"] = "text"
    fields: list[LogField] = field(default_factory=list)  # --log-format, --log-address
    syslog_facility: SyslogFacility = "mail"  # --syslog=FACILITY
    syslog_address: str = "/dev/log"  # the syslog socket (tests point it at their own)


@dataclass
class QueueSettings:
    """The queue runner: when spooled mail is forwarded, retried and bounced.

    It runs only when a plugin implements ``deliver`` (the ``forward`` plugin, say); without one
    the relay is a storage daemon, as E-MailRelay is without forwarding options.
    """

    at_start: bool = False        # --forward: forward the spool at start-up
    poll: float = -1.0            # --poll SECONDS: scan at this interval; 0 = after each message; <0 off
    on_disconnect: bool = False   # --forward-on-disconnect: scan when an SMTP client disconnects
    after_receive: bool = True    # forward each message as soon as it is committed
    as_client: bool = False       # --as-client: forward everything once, then exit (1 if anything failed)
    immediate: bool = False       # --immediate: forward while the client waits for its 250
    rescan: float = 60.0          # safety net: rescan this often for messages others put in the spool
                                  # (relay queue retry, emailrelay-submit, a second process); 0 = never
    concurrency: int = 20         # messages forwarded at once
    retry: list[str] = field(default_factory=lambda: list(DEFAULT_SCHEDULE))
    max_age: str = "5d"           # then a deferred message bounces
    delay_warning: str = ""       # e.g. "4h": one "still trying" notice to the sender


@dataclass
class ClientSettings:
    prompt_timeout: float = 20.0  # --prompt-timeout: wait for the next hop's 220


@dataclass
class DnsSettings:
    nameservers: list[str] = field(default_factory=list)  # "addr" or "addr:port"; empty = system's
    timeout: float = 5.0
    attempts: int = 2


@dataclass
class PluginsSettings:
    enable: list[str] = field(default_factory=list)
    hook_timeout: float = 30.0


@dataclass
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    smtp: SmtpSettings = field(default_factory=SmtpSettings)
    tls: TlsSettings = field(default_factory=TlsSettings)
    spool: SpoolSettings = field(default_factory=SpoolSettings)
    log: LogSettings = field(default_factory=LogSettings)
    client: ClientSettings = field(default_factory=ClientSettings)
    queue: QueueSettings = field(default_factory=QueueSettings)
    dns: DnsSettings = field(default_factory=DnsSettings)
    plugins: PluginsSettings = field(default_factory=PluginsSettings)
    #: validated plugin sections, by section name
    extra: dict[str, Any] = field(default_factory=dict)
    config_file: str = ""


CORE_SECTIONS: dict[str, type] = {f.name: f.default_factory().__class__  # type: ignore[misc]
                                  for f in dataclasses.fields(Settings)
                                  if f.name not in ("extra", "config_file")}

_RANGES: dict[str, tuple[float, float]] = {
    "smtp.port": (0, 65535), "smtp.size": (0, 2**40), "smtp.idle_timeout": (1, 86400),
    "smtp.max_recipients": (1, 100000),
    "smtp.command_timeout": (1, 86400), "smtp.min_data_rate": (0, 2**30), "smtp.max_connections": (0, 10**6),
    "smtp.max_connections_per_client": (0, 10**6), "smtp.max_hops": (1, 1000), "smtp.shutdown_grace": (0, 3600),
    "server.workers": (1, 256), "client.prompt_timeout": (0, 3600), "dns.timeout": (0.1, 300),
    "dns.attempts": (1, 10), "plugins.hook_timeout": (0.1, 3600), "log.verbose": (0, 5),
    "queue.concurrency": (1, 10000), "queue.poll": (-1, 86400 * 7), "queue.rescan": (0, 86400 * 7),
}


def build_settings(raw: dict[str, Any], sources: Sources, plugin_schemas: dict[str, type],
                   warnings: list[str] | None = None) -> Settings:
    """Validate the merged raw configuration into :class:`Settings`."""
    settings = Settings()
    for name, value in raw.items():
        if name in CORE_SECTIONS:
            setattr(settings, name, build_section(CORE_SECTIONS[name], value, name, sources))
        elif name in plugin_schemas:
            settings.extra[name] = build_section(plugin_schemas[name], value, name, sources)
        elif isinstance(value, dict):
            if warnings is not None:
                where = sources.where(name)
                warnings.append(f"{where + ': ' if where else ''}[{name}]: no enabled plugin declares "
                                "this section; it is ignored")
        else:
            raise ConfigError(f"{sources.describe(name)}: unknown top-level key (settings belong in a "
                              f"[section]; known sections: {', '.join(sorted(CORE_SECTIONS))})")
    for name, schema in plugin_schemas.items():
        settings.extra.setdefault(name, build_section(schema, {}, name, sources))
    _check_cross_field(settings, sources)
    return settings


def build_section(cls: type, data: Any, section: str, sources: Sources) -> Any:
    """Validate one ``[section]`` table against dataclass ``cls``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{sources.describe(section)}: expected a [{section}] table")
    if cls is dict:  # a free-form table (e.g. [routes]); the plugin validates the entries
        return dict(data)
    if get_origin(cls) is dict:  # dict[str, Dataclass]: named sub-tables, [section.NAME] each
        item = get_args(cls)[1]
        return {str(name): build_section(item, table, f"{section}.{name}", sources) for name, table in data.items()}
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{section}.{key}"
        if key not in fields:
            raise ConfigError(f"{sources.describe(dotted)}: unknown key (known: "
                              f"{', '.join(sorted(fields))})")
        values[key] = _coerce(value, hints[key], dotted, sources)
        lo_hi = _RANGES.get(dotted)
        if lo_hi and not lo_hi[0] <= values[key] <= lo_hi[1]:
            raise ConfigError(f"{sources.describe(dotted)}: {value!r} is out of range "
                              f"{lo_hi[0]:g}..{lo_hi[1]:g}")
    return cls(**values)


def _coerce(value: Any, hint: Any, dotted: str, sources: Sources) -> Any:
    origin = get_origin(hint)
    bad = f"{sources.describe(dotted)}: "
    if origin is Literal:
        choices = get_args(hint)
        if value not in choices:
            raise ConfigError(bad + f"{value!r} is not one of {', '.join(repr(c) for c in choices)}")
        return value
    if origin in (list, typing.List):
        (item,) = get_args(hint) or (Any,)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(bad + f"expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, item, dotted, sources) for v in value]
    if origin in (dict, typing.Dict):
        if not isinstance(value, dict):
            raise ConfigError(bad + f"expected a table, got {value!r}")
        return value
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in get_args(hint):
            return None
        hint = next(a for a in get_args(hint) if a is not type(None))
        return _coerce(value, hint, dotted, sources)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _YES | _NO:
            return value.lower() in _YES
        raise ConfigError(bad + f"expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(bad + f"expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(bad + f"expected an integer, got {value!r}") from None
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(bad + f"expected a number, got {value!r}")
        try:
            return float(value)
        except ValueError:
            raise ConfigError(bad + f"expected a number, got {value!r}") from None
    if hint is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(bad + f"expected text, got {value!r}")
        return str(value)
    return value


_YES = {"y", "yes", "t", "true", "1", "on"}
_NO = {"n", "no", "f", "false", "0", "off"}


def _check_cross_field(settings: Settings, sources: Sources) -> None:
    for ns in settings.dns.nameservers:
        from ..dns import parse_nameserver  # local import: dns imports dnspython
        try:
            parse_nameserver(ns)
        except ConfigError as e:
            where = sources.where("dns.nameservers")
            raise ConfigError(f"{where}: {e}" if where else str(e)) from None
    for key in ("max_age", "delay_warning"):
        value = getattr(settings.queue, key)
        if value:
            try:
                parse_duration(value)
            except ValueError as e:
                raise ConfigError(f"{sources.describe('queue.' + key)}: {e}") from None
    try:
        parse_schedule(settings.queue.retry)
    except ValueError as e:
        raise ConfigError(f"{sources.describe('queue.retry')}: {e}") from None
    if settings.smtp.size and settings.smtp.size < 1024:
        raise ConfigError(f"{sources.describe('smtp.size')}: {settings.smtp.size} is too small to hold "
                          "a message (0 means no limit)")
    settings.spool.dir = str(Path(settings.spool.dir).expanduser())
    _check_tls(settings.tls, sources)
    _check_proxy(settings, sources)
    mode = settings.server.unix_socket_mode
    if not (mode.isdigit() and set(mode) <= set("01234567") and int(mode, 8) <= 0o777):
        raise ConfigError(f"{sources.describe('server.unix_socket_mode')}: {mode!r} is not a file mode "
                          "(octal, as for chmod: \"0660\")")


def _check_proxy(settings: Settings, sources: Sources) -> None:
    """``trusted_proxies`` are addresses or networks; the PROXY header comes before any TLS."""
    for entry in settings.server.trusted_proxies:
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise ConfigError(f"{sources.describe('server.trusted_proxies')}: {entry!r} is not an "
                              "address or network") from None
    if settings.server.proxy_protocol and settings.tls.connection:
        raise ConfigError(f"{sources.describe('server.proxy_protocol')}: the PROXY protocol cannot be used "
                          "with implicit TLS (--server-tls-connection); use STARTTLS")


def _check_tls(tls: TlsSettings, sources: Sources) -> None:
    """E-MailRelay's rules for combining the --server-tls options."""
    from ..tls import parse_tls_config  # local import: keeps ssl out of plain config loading
    try:
        for key, value in parse_tls_config(tls.config).items():
            setattr(tls, key, value)
    except ValueError as e:
        raise ConfigError(f"{sources.describe('tls.config')}: {e}") from None
    if tls.starttls and tls.connection:
        raise ConfigError(f"{sources.describe('tls.connection')}: STARTTLS (--server-tls) and implicit TLS "
                          "(--server-tls-connection) cannot be used together")
    if tls.enabled and not tls.certificate:
        raise ConfigError(f"{sources.describe('tls.certificate')}: TLS needs a certificate "
                          "(--server-tls-certificate)")
    for key in ("certificate", "key", "verify", "required"):
        if getattr(tls, key) and not tls.enabled:
            raise ConfigError(f"{sources.describe('tls.' + key)}: needs [tls] starttls or connection "
                              "(--server-tls or --server-tls-connection)")
    if tls.key and not tls.certificate:
        raise ConfigError(f"{sources.describe('tls.key')}: needs [tls] certificate")
    versions = list(get_args(TlsVersion))
    if tls.max_version and versions.index(tls.max_version) < versions.index(tls.min_version):
        raise ConfigError(f"{sources.describe('tls.max_version')}: {tls.max_version} is below min_version "
                          f"{tls.min_version}")
    # Absolute now: the daemon changes directory to "/", and SIGHUP re-reads these files.
    for key in ("certificate", "key", "verify"):
        value = getattr(tls, key)
        if value and value != "<default>":
            setattr(tls, key, os.path.abspath(os.path.expanduser(value)))
