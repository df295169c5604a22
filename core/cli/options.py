"""E-MailRelay's command-line options: one table drives the click options, the E-MailRelay
options-file reader and the mapping onto ``relay.conf`` keys.

Later issues add rows (forwarding, filters, TLS, AUTH, POP, admin); each row says how its value
lands in the raw configuration, so the command line always overrides the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

from ..config.loader import ConfigError

Kind = Literal["flag", "value", "count", "multi", "optional"]  # optional: --opt or --opt=VALUE
Apply = Callable[[dict[str, Any], Any], None]


# Values stay as given ("25", "abc"): validation coerces them and names the option in its error.
def _set(section: str, key: str, transform: Callable[[Any], Any] = lambda v: v) -> Apply:
    def apply(raw: dict[str, Any], value: Any) -> None:
        raw.setdefault(section, {})[key] = transform(value)
    return apply


def _split_list(values: Any) -> list[str]:
    out: list[str] = []
    for v in values if isinstance(values, (list, tuple)) else [values]:
        out += [p.strip() for p in str(v).split(",") if p.strip()]
    return out


def _list_of(section: str, key: str) -> Apply:
    """A list option: each use adds to the list (``--filter a --filter b`` is ``a,b``)."""
    def apply(raw: dict[str, Any], value: Any) -> None:
        raw.setdefault(section, {})[key] = _split_list(value)
    return apply


ANONYMOUS_SCOPES = ("vrfy", "server", "content", "client")


def _anonymous(raw: dict[str, Any], value: Any) -> None:
    """E-MailRelay's ``--anonymous[=vrfy,server,content,client]`` (no value: all of them)."""
    scopes = [v.lower() for v in _split_list(value) if v.lower() != "all"] if value not in (True, "all") else []
    unknown = [v for v in scopes if v not in ANONYMOUS_SCOPES]
    if unknown:
        raise ConfigError(f"--anonymous: unknown scope {unknown[0]!r} (known: {', '.join(ANONYMOUS_SCOPES)})")
    raw.setdefault("smtp", {})["anonymous"] = scopes or list(ANONYMOUS_SCOPES)


def _as_server(raw: dict[str, Any], value: Any) -> None:
    raw.setdefault("log", {}).update(enabled=True, close_stderr=True)


# --server-smtp-config keywords and the [smtp] key each one sets.
SMTP_CONFIG_KEYWORDS = {
    "pipelining": "pipelining", "smtputf8": "smtputf8", "smtputf8strict": "smtputf8_strict",
    "strictparsing": "strict_parsing",
}
SMTP_CONFIG_IGNORED = {"alabels", "linger"}  # accepted for compatibility; no effect here


def parse_smtp_config(values: Any) -> dict[str, bool]:
    """``+pipelining,-smtputf8,nostrictparsing`` to ``{key: bool}`` (E-MailRelay's forms:
    ``x``, ``+x``, ``with-x`` on; ``-x``, ``nox``, ``without-x`` off)."""
    result: dict[str, bool] = {}
    for item in _split_list(values):
        word, on = item.lower(), True
        for prefix, state in (("+", True), ("with-", True), ("-", False), ("without-", False)):
            if word.startswith(prefix):
                word, on = word[len(prefix):], state
                break
        else:
            if word.startswith("no") and (word[2:] in SMTP_CONFIG_KEYWORDS or word[2:] in SMTP_CONFIG_IGNORED
                                          or word[2:] == "chunking"):
                word, on = word[2:], False
        if word in SMTP_CONFIG_IGNORED:
            continue
        if word == "chunking":
            if on:
                raise ConfigError("--server-smtp-config: chunking (BDAT) is not supported by this relay")
            continue
        if word not in SMTP_CONFIG_KEYWORDS:
            known = ", ".join(sorted([*SMTP_CONFIG_KEYWORDS, "chunking", *SMTP_CONFIG_IGNORED]))
            raise ConfigError(f"--server-smtp-config: unknown keyword {item!r} (known: {known})")
        result[SMTP_CONFIG_KEYWORDS[word]] = on
    return result


def _forward_to(raw: dict[str, Any], value: Any) -> None:
    raw.setdefault("forward", {})["to"] = str(value)


def _as_client(raw: dict[str, Any], value: Any) -> None:
    # E-MailRelay: --log --no-syslog --no-daemon --dont-serve --forward --forward-to
    raw.setdefault("log", {}).update(enabled=True, syslog=False)
    raw.setdefault("server", {})["daemon"] = False
    raw.setdefault("smtp", {})["enabled"] = False
    raw.setdefault("queue", {}).update(at_start=True, as_client=True)
    _forward_to(raw, value)


def _trigger(key: str, transform: Callable[[Any], Any] = lambda v: v) -> Apply:
    """An E-MailRelay forwarding trigger: giving one means forwarding happens on the triggers
    given, not also on every received message (our default when only --forward-to is given)."""
    def apply(raw: dict[str, Any], value: Any) -> None:
        raw.setdefault("queue", {}).update({key: transform(value), "after_receive": False})
    return apply


def _as_proxy(raw: dict[str, Any], value: Any) -> None:
    # E-MailRelay 2.6: --log --close-stderr --forward-on-disconnect --forward-to
    raw.setdefault("log", {}).update(enabled=True, close_stderr=True)
    _trigger("on_disconnect")(raw, True)
    _forward_to(raw, value)


def _client_smtp_config(raw: dict[str, Any], value: Any) -> None:
    """E-MailRelay's client keywords: pipelining is a setting; the strict ones are always in
    effect here (a next hop without SMTPUTF8/8BITMIME gets no message that needs them)."""
    for item in _split_list(value):
        word, on = item.lower(), True
        for prefix, state in (("+", True), ("with-", True), ("-", False), ("without-", False), ("no", False)):
            if word.startswith(prefix) and word[len(prefix):] in _CLIENT_KEYWORDS:
                word, on = word[len(prefix):], state
                break
        if word not in _CLIENT_KEYWORDS:
            raise ConfigError(f"--client-smtp-config: unknown keyword {item!r} "
                              f"(known: {', '.join(sorted(_CLIENT_KEYWORDS))})")
        if word == "pipelining":
            raw.setdefault("forward", {})["pipelining"] = on


_CLIENT_KEYWORDS = {"pipelining", "smtputf8strict", "eightbitstrict", "binarymimestrict"}


def _smtp_config(raw: dict[str, Any], value: Any) -> None:
    raw.setdefault("smtp", {}).update(parse_smtp_config(value))


@dataclass(frozen=True)
class Option:
    long: str
    short: str | None
    kind: Kind
    apply: Apply | None
    help: str
    metavar: str = ""
    plugin: str = ""  # a built-in plugin this option needs: giving the option enables it

    @property
    def dest(self) -> str:
        return self.long.replace("-", "_")


OPTIONS: list[Option] = [
    Option("port", "p", "value", _set("smtp", "port"), "SMTP listening port (default 2525)", "PORT"),
    Option("interface", "I", "multi", _set("smtp", "interface", _split_list),
           "listening addresses or interface names, comma-separated; smtp=ADDR limits one to SMTP",
           "ADDRESS-LIST"),
    Option("spool-dir", "s", "value", _set("spool", "dir"), "spool directory", "DIR"),
    Option("domain", "D", "value", _set("server", "domain"),
           "domain name for the greeting, EHLO reply and Received: headers", "FQDN"),
    Option("remote-clients", "r", "flag", _set("smtp", "remote_clients"),
           "accept connections from non-loopback addresses"),
    Option("size", "M", "value", _set("smtp", "size"), "maximum message size in octets (0: no limit)",
           "BYTES"),
    Option("no-daemon", "t", "flag", lambda raw, v: raw.setdefault("server", {}).update(daemon=False),
           "run in the foreground"),
    Option("as-server", "d", "flag", _as_server, "run as a storage daemon (--log --close-stderr)"),
    Option("log", "l", "flag", _set("log", "enabled"), "log to stderr and syslog"),
    Option("verbose", "v", "count", _set("log", "verbose"), "more logging (repeatable)"),
    Option("log-file", "N", "value", _set("log", "file"), "log to FILE instead of stderr (%d: date)", "FILE"),
    Option("log-time", "L", "flag", _set("log", "time"), "add a timestamp to each log line"),
    Option("no-syslog", "n", "flag", lambda raw, v: raw.setdefault("log", {}).update(syslog=False),
           "do not log to syslog"),
    Option("close-stderr", "e", "flag", _set("log", "close_stderr"), "close stderr after start-up"),
    Option("pid-file", "i", "value", _set("server", "pid_file"), "write the process id to FILE", "FILE"),
    Option("idle-timeout", None, "value", _set("smtp", "idle_timeout"),
           "seconds a client may stay silent (default 300)", "SECONDS"),
    Option("prompt-timeout", "w", "value", _set("client", "prompt_timeout"),
           "seconds to wait for the next hop's greeting (default 20)", "SECONDS"),
    Option("server-smtp-config", "Z", "multi", _smtp_config,
           "SMTP server features: [+|-]pipelining, smtputf8, smtputf8strict, strictparsing", "CONFIG"),
    Option("no-smtp", "X", "flag", lambda raw, v: raw.setdefault("smtp", {}).update(enabled=False),
           "do not run the SMTP server"),
    Option("forward-to", "o", "value", _forward_to, "forward to this SMTP server (host:port), or \"mx\"",
           "HOST:PORT", plugin="forward"),
    Option("forward", "f", "flag", _trigger("at_start"), "forward the spool at start-up"),
    Option("immediate", "m", "flag", _trigger("immediate"),
           "forward each message before acknowledging it (the client gets the next hop's answer)"),
    Option("forward-on-disconnect", "1", "flag", _trigger("on_disconnect"),
           "forward when an SMTP client that sent mail disconnects"),
    Option("poll", "O", "value", _trigger("poll"),
           "scan the spool every SECONDS (0: forward each message as it arrives)", "SECONDS"),
    Option("as-client", "q", "value", _as_client,
           "forward the spool once and exit (--log --no-syslog --no-daemon --dont-serve --forward "
           "--forward-to)", "HOST:PORT", plugin="forward"),
    Option("as-proxy", "y", "value", _as_proxy,
           "store and forward on disconnect (--log --close-stderr --forward-on-disconnect --forward-to)",
           "HOST:PORT", plugin="forward"),
    Option("dont-serve", "x", "flag", lambda raw, v: raw.setdefault("smtp", {}).update(enabled=False),
           "run no servers (forwarding only)"),
    Option("connection-timeout", "U", "value", _set("forward", "connection_timeout"),
           "seconds to wait for a connection to the next hop (default 40)", "SECONDS"),
    Option("response-timeout", "T", "value", _set("forward", "response_timeout"),
           "seconds to wait for each reply of the next hop (default 60)", "SECONDS"),
    Option("client-interface", "6", "value", _set("forward", "client_interface"),
           "local address to forward from", "ADDRESS"),
    Option("client-auth", "C", "value", _set("forward", "client_auth"),
           "log in to the next hop with the 'client' account in this E-MailRelay secrets file", "FILE"),
    Option("client-tls-required", None, "flag", lambda raw, v: raw.setdefault("forward", {}).update(tls="required"),
           "never forward without STARTTLS"),
    Option("client-smtp-config", None, "multi", _client_smtp_config,
           "SMTP client features: [+|-]pipelining (default on)", "CONFIG"),
    Option("forward-to-all", None, "flag", lambda raw, v: raw.setdefault("forward", {}).update(recipients="all"),
           "fail the message if the next hop refuses any recipient"),
    Option("forward-to-some", None, "flag",
           lambda raw, v: raw.setdefault("forward", {}).update(recipients="some"),
           "deliver to the recipients the next hop accepts (the default)"),
    Option("filter", "z", "multi", _list_of("filters", "server"),
           "filters run before a message is acknowledged (comma-separated chain)", "SPEC", plugin="filters"),
    Option("client-filter", "Y", "multi", _list_of("filters", "client"),
           "filters run before a message is forwarded (comma-separated chain)", "SPEC", plugin="filters"),
    Option("filter-timeout", "W", "value", _set("filters", "timeout"),
           "seconds a filter may run before it is killed (default 60)", "SECONDS", plugin="filters"),
    Option("delivery-dir", None, "value", _set("filters", "delivery_dir"),
           "base directory of the mailboxes that deliver: and copy: fill (default: the spool)", "DIR",
           plugin="filters"),
    Option("dnsbl", None, "value", _set("dnsbl", "spec"),
           "refuse clients named by DNS block lists: LIST[,LIST...][,THRESHOLD[,TIMEOUT_MS[,DNS-ADDR]]]",
           "CONFIG", plugin="dnsbl"),
    Option("address-verifier", None, "value", _set("verifier", "program"),
           "check each recipient with PROGRAM, net:HOST:PORT or account: (E-MailRelay's contract)",
           "PROGRAM", plugin="verifier"),
    Option("server-tls", "K", "flag", _set("tls", "starttls"),
           "offer STARTTLS to SMTP clients (needs --server-tls-certificate)"),
    Option("server-tls-connection", None, "flag", _set("tls", "connection"),
           "the SMTP port speaks TLS from the first byte (SMTPS, as on port 465)"),
    Option("server-tls-required", None, "flag", _set("tls", "required"),
           "refuse every command but EHLO, STARTTLS, NOOP and QUIT before TLS"),
    Option("server-tls-certificate", None, "multi",  # given twice: the key file, then the certificate
           lambda raw, v: raw.setdefault("tls", {}).update(
               {"key": v[0], "certificate": v[1]} if len(v) == 2 else {"certificate": v[0] if len(v) == 1 else list(v)}),
           "PEM file with the private key and certificate chain (or twice: key file, then certificate file)",
           "PEM-FILE"),
    Option("server-tls-verify", None, "value", _set("tls", "verify"),
           "require client certificates from these CAs (a PEM file, a directory or <default>)", "CA-LIST"),
    Option("tls-config", "9", "multi", _set("tls", "config", _split_list),
           "TLS keywords: tlsv1.3 sets the minimum version (default tlsv1.2), -tlsv1.3 the maximum", "OPTIONS"),
    Option("server-auth", "S", "value", _set("auth", "server_auth"),
           "require SMTP AUTH, with the 'server' accounts of this E-MailRelay secrets file, or pam: for PAM",
           "FILE", plugin="auth"),
    Option("server-auth-config", None, "value", _set("auth", "server_auth_config"),
           "AUTH mechanisms: m:ALLOW;x:DENY without TLS, a:ALLOW;d:DENY under TLS (e.g. m:;a:plain,login)",
           "CONFIG", plugin="auth"),
    Option("anonymous", "A", "optional", _anonymous,
           "say less about this relay: no VRFY, a plain greeting, no Received: header (or a "
           "comma-separated choice of vrfy, server, content, client)", "[SCOPE]"),
    Option("plugins", None, "multi", _set("plugins", "enable", _split_list),
           "enable plugins by name, in this order (comma-separated)", "NAMES"),
]

BY_LONG = {o.long: o for o in OPTIONS}
BY_SHORT = {o.short: o for o in OPTIONS if o.short}


def apply_options(raw: dict[str, Any], given: dict[str, Any]) -> list[str]:
    """Apply option values given on the command line (``{dest: value}``) onto ``raw``; return the
    built-in plugins those options need (to be enabled in addition to the configured ones)."""
    needed: list[str] = []
    for option in OPTIONS:
        value = given.get(option.dest)
        if value in (None, False, 0, ()) or option.apply is None:
            continue
        option.apply(raw, value)
        if option.plugin and option.plugin not in needed:
            needed.append(option.plugin)
    return needed
