"""``relay-sendmail``: the ``sendmail`` command line that applications and cron call.

    relay-sendmail -t -i < message            # recipients from To/Cc/Bcc
    relay-sendmail -f app@example.com -F "The App" alice@example.org < message
    relay-sendmail -bs                         # SMTP on stdin/stdout

Options as Postfix's and Sendmail's ``sendmail(1)``: ``-t`` (recipients from the headers, added
to any given as arguments; ``Bcc`` removed), ``-i``/``-oi`` (a line with a single dot does not end
the message), ``-f``/``-r`` (envelope sender), ``-F`` (full name for a ``From:`` header the message
lacks), ``-C`` (relay.conf), ``-bm`` (the default), ``-bs``; options with no meaning here (``-oem``,
``-odi``, ``-B8BITMIME``, ``-N``, ``-v``, ...) are accepted and ignored. The message is written
into the spool like ``relay submit`` (``From``, ``Date`` and ``Message-ID`` added when missing).

``-bs`` hands the session to the running relay's SMTP port, so every policy, filter and limit
applies exactly as to a network client; without a running relay it fails with EX_UNAVAILABLE.
Exit codes are sysexits.h: 0 queued, 64 usage (including no recipients), 65 bad data, 67 bad
recipient, 69 no relay for -bs, 73 spool not writable, 75 temporary failure, 78 configuration.
"""

from __future__ import annotations

import getopt
import os
import selectors
import socket
import ssl
import sys
from typing import BinaryIO

from ..config import ConfigError
from ..config.settings import Settings
from ..net import addresses_for
from ..plugin_host import PluginError
from ..submission import (EX_CONFIG, EX_IOERR, EX_UNAVAILABLE, EX_USAGE, SubmissionError, complete_headers,
                          crlf, envelope_from_headers, local_sender, looks_like_a_message, qualify, strip_fields,
                          submit)

# Postfix's option letters: those with ":" take a value (attached, "-fuser", or separate).
_OPTIONS = "A:B:C:F:GIL:N:O:R:UV:X:b:ce:f:h:imno:p:r:qtvx"
PROG = "relay-sendmail"


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return code


def read_message(stream: BinaryIO, dot_ends: bool) -> bytes:
    """The message from ``stream``; without ``-i`` a line holding a single dot ends it."""
    if not dot_ends:
        return stream.read()
    lines = []
    for line in iter(stream.readline, b""):
        if line.rstrip(b"\r\n") == b".":
            break
        lines.append(line)
    return b"".join(lines)


def _settings(config: str | None) -> Settings:
    from . import load  # the CLI package; imported here so --help-free startup stays light

    settings, _, _ = load(config, {})
    return settings


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: the exit status is the sysexits.h code returned."""
    return run(sys.argv[1:] if argv is None else argv, sys.stdin.buffer)


def run(argv: list[str], stdin: BinaryIO) -> int:
    try:
        options, arguments = getopt.gnu_getopt(argv, _OPTIONS)
    except getopt.GetoptError as e:
        return _fail(f"{e} (usage: {PROG} [-t] [-i] [-f sender] [-F name] [recipient ...])", EX_USAGE)
    mode, config, sender, full_name = "m", None, None, ""
    from_headers, dot_ends, verbose = False, True, False
    for option, value in options:
        if option == "-t":
            from_headers = True
        elif option == "-i" or (option == "-o" and value == "i"):
            dot_ends = False
        elif option in ("-f", "-r"):
            sender = value
        elif option == "-F":
            full_name = value
        elif option == "-C":
            config = value
        elif option == "-b":
            mode = value[:1]
        elif option == "-v":
            verbose = True
        elif option in ("-q", "-I"):
            return _fail(f"{option}: not supported (the relay runs its own queue)", EX_USAGE)
    if mode not in ("m", "s", "i"):
        return _fail(f"-b{mode}: not supported (use -bm or -bs)", EX_USAGE)
    if mode == "i":  # newaliases: there is no alias database here
        return 0
    try:
        settings = _settings(config)
    except (ConfigError, PluginError) as e:
        return _fail(str(e), EX_CONFIG)
    if mode == "s":
        return smtp_over_stdio(settings, stdin)
    domain = settings.server.effective_domain()
    content = crlf(read_message(stdin, dot_ends))
    if not looks_like_a_message(content):  # `echo text | sendmail root`: all body, no headers
        content = b"\r\n" + content
    recipients = [qualify(a, domain) for arg in arguments for a in arg.split(",") if a.strip()]
    if from_headers:
        try:
            found = envelope_from_headers(content, use_return_path=False).recipients
        except SubmissionError as e:
            return _fail(str(e), e.exit_code)
        recipients += [qualify(a, domain) for a in found if qualify(a, domain) not in recipients]
    if not recipients:
        return _fail("no recipient addresses" + ("" if from_headers else " (give them as arguments, or -t "
                                                 "to take them from To, Cc and Bcc)"), EX_USAGE)
    if sender is None:
        sender = local_sender(domain)
    sender = "" if sender.strip() in ("", "<>") else qualify(sender, domain)
    content = complete_headers(strip_fields(content, {"bcc"}), sender=sender or local_sender(domain),
                               full_name=full_name, domain=domain)
    try:
        message_id = submit(settings, sender, recipients, content, tool="sendmail")
    except SubmissionError as e:
        return _fail(str(e), e.exit_code)
    if verbose:
        print(f"{PROG}: queued as {message_id}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- -bs
def _relay_address(settings: Settings) -> tuple[int, object]:
    """Where the running relay listens for SMTP: (address family, socket address)."""
    smtp = settings.smtp
    for item in smtp.interface:  # a Unix socket: "/path" or "smtp=/path"
        path = item.partition("=")[2] if item.startswith("smtp=") else item
        if path.startswith("/"):
            return socket.AF_UNIX, path
    try:
        hosts = addresses_for("smtp", [i for i in smtp.interface if "/" not in i], any_default=smtp.remote_clients)
    except ValueError:  # an interface this host lacks, or an inherited socket: try loopback
        hosts = []
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(hosts[0], hosts[0]) if hosts else "127.0.0.1"
    return (socket.AF_INET6 if ":" in host else socket.AF_INET), (host, smtp.port)


def smtp_over_stdio(settings: Settings, stdin: BinaryIO) -> int:
    """Relay bytes between stdin/stdout and the running daemon's SMTP port until either side ends."""
    if not settings.smtp.enabled:
        return _fail("-bs: the relay does not serve SMTP (--no-smtp)", EX_UNAVAILABLE)
    family, address = _relay_address(settings)
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(address)  # type: ignore[arg-type]
        if settings.tls.connection:  # our own relay on this host: the channel is local either way
            context = ssl.create_default_context()
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            sock = context.wrap_socket(sock)
        if settings.server.proxy_protocol:
            sock.sendall(b"PROXY UNKNOWN\r\n")  # "no client address": the relay keeps ours
    except OSError as e:
        return _fail(f"-bs: no relay is listening at {address}: {e.strerror or e}", EX_UNAVAILABLE)
    sock.settimeout(None)
    out = sys.stdout.buffer
    in_fd = stdin.fileno()
    selector = selectors.SelectSelector()  # select(), unlike epoll, takes a regular file as stdin
    selector.register(sock, selectors.EVENT_READ, "relay")
    selector.register(in_fd, selectors.EVENT_READ, "client")
    try:
        while True:
            for key, _ in selector.select():
                if key.data == "relay":
                    data = sock.recv(65536)
                    if not data:
                        return 0
                    while isinstance(sock, ssl.SSLSocket) and sock.pending():
                        data += sock.recv(sock.pending())  # decrypted bytes select() cannot see
                    out.write(data)
                    out.flush()
                else:
                    data = os.read(in_fd, 65536)
                    if not data:  # the client is done: let the relay finish its replies
                        selector.unregister(in_fd)
                        if isinstance(sock, ssl.SSLSocket):
                            return 0  # TLS cannot be half-closed
                        try:
                            sock.shutdown(socket.SHUT_WR)
                        except OSError:
                            return 0
                        continue
                    sock.sendall(data)
    except OSError as e:
        return _fail(f"-bs: {e.strerror or e}", EX_IOERR)
    finally:
        selector.close()
        sock.close()
