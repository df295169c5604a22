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


def _client_tls(raw: dict[str, Any], value: Any) -> None:
    # Not over --client-tls-required (applied first): -j -r means STARTTLS, required.
    raw.setdefault("forward", {}).setdefault("tls", "opportunistic")


def _client_tls_connection(raw: dict[str, Any], value: Any) -> None:
    forward = raw.setdefault("forward", {})
    if forward.get("tls") == "opportunistic":  # only --client-tls sets that on the command line
        raise ConfigError("the --client-tls and --client-tls-connection options cannot be used together")
    forward["tls_connection"] = True


def _client_tls_certificate(raw: dict[str, Any], value: Any) -> None:
    files = list(value)
    if len(files) > 2:
        raise ConfigError("the --client-tls-certificate option cannot be used more than twice")
    raw.setdefault("forward", {}).update(
        {"tls_key": files[0], "tls_certificate": files[1]} if len(files) == 2 else {"tls_certificate": files[0]})


SYSLOG_FACILITIES = ("mail", "user", "daemon", *(f"local{n}" for n in range(8)))


def _syslog(raw: dict[str, Any], value: Any) -> None:
    """``--syslog[=FACILITY]``: applied after --no-syslog and --as-client, so it wins over them."""
    log = raw.setdefault("log", {})
    log["syslog"] = True
    if value not in (True, "all", ""):
        facility = str(value).lower()
        if facility not in SYSLOG_FACILITIES:
            raise ConfigError(f"--syslog: invalid facility {value!r} (use {', '.join(SYSLOG_FACILITIES[:3])} "
                              "or local0 to local7)")
        log["syslog_facility"] = facility


LOG_FIELDS = ("time", "unit", "address", "port", "msgid")


def _log_fields(*implied: str) -> Apply:
    """``--log-format=time,address`` (repeatable) and ``--log-address``: fields added to log lines."""
    def apply(raw: dict[str, Any], value: Any) -> None:
        log = raw.setdefault("log", {})
        fields = list(log.get("fields", []))
        for name in [*(v.lower() for v in (_split_list(value) if value is not True else [])), *implied]:
            if name not in LOG_FIELDS:
                raise ConfigError(f"--log-format: unknown field {name!r} (known: {', '.join(LOG_FIELDS)})")
            if name not in fields:
                fields.append(name)
        log["fields"] = fields
    return apply


def _debug(raw: dict[str, Any], value: Any) -> None:
    log = raw.setdefault("log", {})
    log["verbose"] = max(int(log.get("verbose", 0)), 2)  # our most verbose level


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
           "listening addresses or interface names, comma-separated; smtp=ADDR or pop=ADDR limits one to "
           "that listener",
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
    Option("pop", "B", "flag", lambda raw, v: raw.setdefault("pop3", {}),
           "run the POP3 server (needs --pop-auth)", plugin="pop3"),
    Option("pop-port", "E", "value", _set("pop3", "port"), "POP3 listening port (default 110)", "PORT"),
    Option("pop-auth", "F", "value", _set("pop3", "auth"),
           "POP3 accounts: the 'server' lines of this E-MailRelay secrets file, or pam: for PAM", "FILE"),
    Option("pop-by-name", "J", "flag", _set("pop3", "by_name"),
           "each POP3 user reads the mailbox named after the user in the delivery directory"),
    Option("pop-no-delete", "G", "flag", _set("pop3", "no_delete"),
           "POP3 DELE appears to succeed but nothing is removed"),
    Option("pop-tls-port", None, "value", _set("pop3", "tls_port"),
           "also serve POP3S (TLS from the first byte, as on port 995) on this port", "PORT"),
    Option("admin", "a", "value", _set("admin", "listen"),
           "serve the admin web UI and JSON API on this port (loopback unless --interface admin=ADDR)",
           "PORT", plugin="admin"),
    Option("admin-terminate", "Q", "flag", _set("admin", "terminate"),
           "let POST /api/v1/terminate stop the relay (as SIGTERM does)", plugin="admin"),
    Option("client-tls", "j", "flag", _client_tls,
           "use STARTTLS to the next hop when it is offered (the default here)"),
    Option("client-tls-connection", "b", "flag", _client_tls_connection,
           "talk TLS to the next hop from the first byte (SMTPS, as on port 465)"),
    Option("client-tls-certificate", None, "multi", _client_tls_certificate,
           "PEM file with the private key and certificate chain presented to the next hop (or twice: "
           "key file, then certificate file)", "PEM-FILE"),
    Option("client-tls-server-name", None, "value", _set("forward", "tls_server_name"),
           "the server name sent in the TLS handshake (SNI)", "HOSTNAME"),
    Option("client-tls-verify", None, "value", _set("forward", "tls_ca"),
           "verify the next hop's certificate against these CAs (a PEM file, a directory or <default>)",
           "CA-LIST"),
    Option("client-tls-verify-name", None, "value", _set("forward", "tls_verify_name"),
           "the name the next hop's certificate must carry (needs --client-tls-verify)", "NAME"),
    Option("client-auth-config", None, "value", _set("forward", "client_auth_config"),
           "AUTH mechanisms to use with the next hop, in order of preference: m:PREFER;x:AVOID without TLS, "
           "a:PREFER;d:AVOID under TLS (e.g. m:cram-md5,plain)", "CONFIG"),
    Option("syslog", "k", "optional", _syslog,
           "log to syslog even with --no-syslog or --as-client (FACILITY: mail, user, daemon, local0-7)",
           "[FACILITY]"),
    Option("log-format", None, "multi", _log_fields(),
           "add fields to each log line: time, address, port, msgid (unit is accepted)", "FIELDS"),
    Option("log-address", None, "flag", _log_fields("address"),
           "add the client's address to each log line (--log-format=address)"),
    Option("debug", "g", "flag", _debug, "debug-level logging with the SMTP protocol trace (as -vv)"),
    Option("user", "u", "value", _set("server", "user"),
           "when started as root, run as this user once listening (no default: see README)", "USERNAME"),
    Option("localedir", None, "value", _set("server", "localedir"),
           "accepted for compatibility: messages are not translated", "DIR"),
    Option("hidden", "H", "flag", None, "Windows only: accepted and ignored"),
    Option("show", None, "value", None, "Windows only: accepted and ignored", "STYLE"),
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
