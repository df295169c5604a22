"""``verifier``: E-MailRelay's address verifiers (``--address-verifier``), for RCPT TO and VRFY.

    [verifier]
    program = "/usr/local/bin/verify"   # or net:HOST:PORT, account:[OPTIONS], exit:0
    timeout = 0                         # seconds; 0: [filters] timeout (--filter-timeout), else 60
    vrfy = false                        # answer VRFY through the verifier

A program runs for each recipient, without a shell and with E-MailRelay's reduced environment,
with six arguments: the recipient, the sender (empty for VRFY), the client's ``ip:port``
(``ip.port`` for IPv6), the relay's domain, the AUTH mechanism in lower case (``none``) and the
AUTH name. It prints two lines and exits with:

* 0, a local mailbox: line 1 the full name (for VRFY), line 2 the mailbox (``To-Local``);
* 1, a valid remote address: line 2 the address to use (possibly rewritten);
* 3, a temporary failure: ``450`` with line 1 as the text;
* 100, abort: the connection is closed;
* 2, invalid: ``550`` with line 1 as the text (``mailbox unavailable`` when empty); line 2, if
  any, only goes to the log.

Any other exit code, a 0 or 1 without its two lines, a verifier that cannot be run, is killed by
a signal or overruns the timeout is a temporary failure (``450``): the fault is the verifier's,
not the address's, so the client keeps the message and tries again (E-MailRelay answers 550 to
the unknown codes, which bounces mail because of a broken script). ``net:HOST:PORT`` sends the same six
fields as one ``|``-separated line over a kept-open TCP connection and reads one line back:
``0|mailbox|full name``, ``1|address``, ``2|text[|reason]``, ``3|text[|reason]`` or ``100``.
``account:`` makes system accounts (uid 1000-32767 by default) mailboxes at the relay's domain;
options after the colon, ``;``-separated: a uid range (``500-999``), ``lowercase``, ``check``
(unknown users are valid remote addresses), ``remote`` (known users are remote, not local).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import pwd
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Protocol

from mailrelay_sdk import Recipient, Session, Transaction, Verdict, hookimpl

from mailrelay.config.loader import ConfigError
from mailrelay.smtp.addresses import AddressError, normalise_mailbox

from .filters.process import MINIMAL_ENV, run_program

log = logging.getLogger("mailrelay.verifier")

DEFAULT_TIMEOUT = 60.0      # E-MailRelay uses --filter-timeout, whose default this is
DEFAULT_UIDS = (1000, 32767)
MAX_TEXT = 200              # reply text taken from a verifier; keeps the reply line in bounds
UNAVAILABLE = "mailbox unavailable"
CANNOT_VERIFY = "cannot verify the address now"


@dataclass
class VerifierSettings:
    """``[verifier]``."""

    program: str = ""      # --address-verifier
    timeout: float = 0.0   # 0: as [filters] timeout when the filters plugin is on, else 60
    vrfy: bool = False     # E-MailRelay answers VRFY unless --anonymous=vrfy; we do only when asked


@dataclass(frozen=True)
class Request:
    """What a verifier is asked: E-MailRelay's six fields, in order."""

    address: str
    sender: str
    client: str
    domain: str
    mechanism: str
    auth_name: str

    def fields(self) -> list[str]:
        return [self.address, self.sender, self.client, self.domain, self.mechanism, self.auth_name]


@dataclass(frozen=True)
class Outcome:
    """A verifier's answer. ``value`` is the mailbox (local) or the address (remote; empty: as given)."""

    kind: Literal["local", "remote", "invalid", "temporary", "abort"]
    value: str = ""
    full_name: str = ""
    text: str = ""
    reason: str = ""
    broken: bool = False  # the verifier failed (not run, killed, timed out, unreachable)

    @classmethod
    def failure(cls, text: str, reason: str) -> "Outcome":
        return cls("temporary", text=text, reason=reason, broken=True)


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)[:MAX_TEXT].strip()


def outcome_from_program(exit_code: int, stdout: bytes) -> Outcome:
    """Read a verifier program's exit code and output (E-MailRelay's contract)."""
    text = stdout.decode("utf-8", "replace").rstrip(" \t\n").replace("\r\n", "\n").replace("\r", "")
    lines = text.split("\n")
    first = _printable(lines[0])
    second = _printable(lines[1]) if len(lines) > 1 else ""
    if exit_code == 0 and len(lines) >= 2:
        return Outcome("local", second, full_name=first)
    if exit_code == 1 and len(lines) >= 2:
        return Outcome("remote", second)
    if exit_code == 100:
        return Outcome("abort", reason="exit code 100")
    if exit_code in (2, 3):
        kind: Literal["invalid", "temporary"] = "temporary" if exit_code == 3 else "invalid"
        return Outcome(kind, text=first or UNAVAILABLE, reason=second or f"exit code {exit_code}")
    return Outcome.failure(CANNOT_VERIFY, f"verifier broke its contract: exit code {exit_code}"
                           + ("" if exit_code not in (0, 1) else " without two lines of output"))


def outcome_from_line(line: str) -> Outcome:
    """Read a ``net:`` verifier's answer line; anything unrecognised is a temporary failure."""
    parts = [_printable(p) for p in line.rstrip("\r\n").split("|")]
    code = parts[0]
    if code == "100":
        return Outcome("abort", reason="network verifier said 100")
    if code == "1" and len(parts) >= 2:
        return Outcome("remote", parts[1])
    if code == "0" and len(parts) >= 3 and parts[1]:
        return Outcome("local", parts[1], full_name=parts[2])
    if code in ("2", "3") and len(parts) >= 2:
        return Outcome("temporary" if code == "3" else "invalid", text=parts[1] or UNAVAILABLE,
                       reason=parts[2] if len(parts) > 2 else "")
    return Outcome.failure(CANNOT_VERIFY, f"unrecognised answer {line[:80]!r}")


def client_field(session: Session) -> str:
    """The client's address and port as E-MailRelay prints them: ``1.2.3.4:25``, ``::1.25``."""
    host = session.peer_ip.split("%")[0]
    try:
        separator = "." if ipaddress.ip_address(host).version == 6 else ":"
    except ValueError:
        separator = ":"
    return f"{host}{separator}{session.peer_port}"


class Verifier(Protocol):
    async def verify(self, request: Request) -> Outcome: ...
    async def aclose(self) -> None: ...


class _NothingToClose:
    async def aclose(self) -> None:
        """Nothing is kept between requests."""


class ProgramVerifier(_NothingToClose):
    """A program or script (E-MailRelay's ``--address-verifier=/path``)."""

    def __init__(self, path: str, timeout: float):
        resolved = Path(path).expanduser()
        if not resolved.is_absolute():
            resolved = Path.cwd() / resolved
        if not resolved.is_file() or not os.access(resolved, os.X_OK):
            raise ConfigError(f"address verifier {path!r} is not an executable file")
        self.path, self.timeout = str(resolved), timeout

    async def verify(self, request: Request) -> Outcome:
        if any("\0" in field for field in request.fields()):  # cannot be a program argument
            return Outcome("invalid", text=UNAVAILABLE, reason="NUL in a verifier argument")
        run = await run_program([self.path, *request.fields()], env=dict(MINIMAL_ENV), timeout=self.timeout,
                                max_stdout=4096)
        if run.error:
            return Outcome.failure(CANNOT_VERIFY, run.error)
        if run.timed_out:
            return Outcome.failure("address verifier timed out", f"no answer in {self.timeout:g}s")
        if run.exit_code < 0:
            return Outcome.failure(CANNOT_VERIFY, f"verifier killed by signal {-run.exit_code}")
        if run.stderr:
            log.debug("address verifier stderr: %r", run.stderr[:500])
        return outcome_from_program(run.exit_code, run.stdout)

class NetworkVerifier:
    """A verifier server (``net:HOST:PORT``): one request line, one answer line, connections kept."""

    MAX_IDLE = 4

    def __init__(self, location: str, timeout: float):
        host, _, port = location.rpartition(":")
        host = host.strip("[]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"address verifier net:{location}: expected net:HOST:PORT")
        self.host, self.port, self.timeout = host, int(port), timeout
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def verify(self, request: Request) -> Outcome:
        line = ("|".join(request.fields()) + "\n").encode()
        for _ in range(2):
            try:
                return outcome_from_line(await self._exchange(line))
            except _StaleConnection:
                continue  # the server closed an idle connection: once more, on a new one
            except (OSError, ValueError, TimeoutError) as e:
                return Outcome.failure("cannot verify", f"network verifier: {str(e) or 'no answer in time'}")
        return Outcome.failure("cannot verify", "network verifier keeps disconnecting")

    async def _exchange(self, line: bytes) -> str:
        reused = bool(self.idle)
        async with asyncio.timeout(self.timeout):
            reader, writer = self.idle.pop() if reused else await asyncio.open_connection(
                self.host, self.port, limit=8192)
            try:
                writer.write(line)
                answer = await reader.readline()
            except BaseException as e:
                writer.close()
                if reused and isinstance(e, ConnectionError):
                    raise _StaleConnection() from e
                raise
        if not answer.endswith(b"\n"):
            writer.close()
            if reused and not answer:
                raise _StaleConnection()
            raise ConnectionError("the network verifier disconnected")
        if len(self.idle) < self.MAX_IDLE:
            self.idle.append((reader, writer))
        else:
            writer.close()
        return answer.decode("utf-8", "replace")

    async def aclose(self) -> None:
        for _, writer in self.idle:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        self.idle.clear()


class _StaleConnection(Exception):
    """A kept-open connection turned out to be closed by the server."""


class AccountVerifier(_NothingToClose):
    """``account:``: system accounts are mailboxes at the relay's domain (E-MailRelay's rules)."""

    def __init__(self, options: str):
        self.uids, self.lowercase, self.check, self.remote = DEFAULT_UIDS, False, False, False
        for word in filter(None, (w.strip() for w in options.split(";"))):
            if word[0].isdigit():
                low, dash, high = word.partition("-")
                high = high if dash else low
                if not (low.isdigit() and high.isdigit()) or int(high) < int(low):
                    raise ConfigError(f"address verifier account:{options}: {word!r} is not a uid range")
                self.uids = (int(low), int(high))
            elif word == "lowercase" or (len(word) <= 3 and "l" in word):
                self.lowercase = True
            elif word == "remote" or (len(word) <= 3 and "r" in word):
                self.remote = True
            elif word == "check" or (len(word) <= 3 and "c" in word):
                self.check = True
            else:
                raise ConfigError(f"address verifier account:{options}: unknown option {word!r}")

    async def verify(self, request: Request) -> Outcome:
        address = _dequote(request.address)
        user, at, domain = address.rpartition("@")
        if not at:
            user, domain = address, ""
        user = _dequote(user)
        if user == "postmaster" and not domain:
            return Outcome("local", "postmaster")
        mailbox, reason = await asyncio.to_thread(self._lookup, user, domain, request.domain)
        if mailbox:
            return Outcome("remote") if self.remote else Outcome(
                "local", mailbox.lower() if self.lowercase else mailbox)
        return Outcome("remote") if self.check else Outcome("invalid", text="rejected", reason=reason)

    def _lookup(self, user: str, domain: str, local_domain: str) -> tuple[str, str]:
        """(account name, "") or ("", why not). Blocking (NSS), so it runs in a thread."""
        if domain.lower() != local_domain.lower():
            return "", f"[{domain}] does not match [{local_domain}]"
        entry = _getpwnam(user) or (_getpwnam(user.lower()) if user.isascii() else None)
        if entry is None:
            return "", f"[{user}] is not a valid account name"
        if not self.uids[0] <= entry.pw_uid <= self.uids[1]:
            return "", f"uid {entry.pw_uid} is not in the range {self.uids[0]}-{self.uids[1]}"
        return entry.pw_name, ""


def _getpwnam(name: str) -> pwd.struct_passwd | None:
    if not name or "\0" in name:
        return None
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


def _dequote(text: str) -> str:
    return text[1:-1] if len(text) >= 2 and text[0] == text[-1] == '"' else text


class AcceptVerifier(_NothingToClose):
    """``exit:N``: every address is a valid remote one (E-MailRelay's internal verifier)."""

    async def verify(self, request: Request) -> Outcome:
        return Outcome("remote")


def make_verifier(spec: str, timeout: float) -> Verifier:
    """The verifier for an ``--address-verifier`` value; a bad one is a configuration error."""
    scheme, colon, argument = spec.partition(":")
    if colon and scheme == "net":
        return NetworkVerifier(argument, timeout)
    if colon and scheme == "account":
        return AccountVerifier(argument)
    if colon and scheme == "exit":
        if not argument.strip().isdigit():
            raise ConfigError(f"address verifier {spec!r}: not a numeric exit code")
        return AcceptVerifier()
    return ProgramVerifier(argument if colon and scheme == "file" else spec, timeout)


class VerifierPlugin:
    """One instance per relay (the entry point names the class)."""

    def __init__(self) -> None:
        self.verifier: Verifier | None = None
        self.domain = ""
        self.vrfy = False
        self.last = True  # no other on_rcpt_to plugin runs after this one

    @hookimpl
    def relay_config_schema(self) -> dict[str, type]:
        return {"verifier": VerifierSettings}

    @hookimpl
    def relay_startup(self, relay: Any) -> None:
        settings: VerifierSettings = relay.plugin_settings("verifier")
        if not settings.program.strip():
            raise ConfigError("[verifier] program is empty: give --address-verifier PROGRAM (or net:, account:)")
        filters = relay.settings.extra.get("filters")
        timeout = settings.timeout or getattr(filters, "timeout", 0) or DEFAULT_TIMEOUT
        self.verifier = make_verifier(settings.program.strip(), timeout)
        self.domain, self.vrfy = relay.domain, settings.vrfy
        for hook in ("on_rcpt_to", "on_vrfy"):
            relay.hooks.allow_time(hook, timeout + 5)  # our own timeout answers first, with a 450
        impls = relay.hooks.impls("on_rcpt_to")
        self.last = bool(impls) and impls[-1].plugin is self
        log.info("address verifier %s (timeout %gs, VRFY %s)", settings.program, timeout, "on" if self.vrfy else "off")

    @hookimpl
    async def relay_shutdown(self) -> None:
        if self.verifier is not None:
            await self.verifier.aclose()

    async def _ask(self, session: Session, address: str, sender: str) -> Outcome:
        assert self.verifier is not None
        # E-MailRelay passes the AUTH mechanism and name; for a client trusted by a "server none"
        # secrets line, "none" and that line's keyword; "none" and nothing otherwise.
        mechanism = (session.auth_mechanism if session.auth_user else "") or "none"
        name = session.auth_user or str(session.notes.get("trusted") or "")
        request = Request(address, sender, client_field(session), self.domain, mechanism.lower(), name)
        outcome = await self.verifier.verify(request)
        log.info("session=%s rcpt=<%s> verifier: %s %s%s", session.id, address, outcome.kind,
                 outcome.value or outcome.text, f" ({outcome.reason})" if outcome.reason else "")
        return outcome

    @hookimpl
    async def on_rcpt_to(self, session: Session, transaction: Transaction, recipient: Recipient) -> Verdict | None:
        outcome = await self._ask(session, recipient.address, transaction.sender)
        if outcome.kind == "local":
            return Verdict.ok(recipient=Recipient.local(recipient.address, outcome.value))
        if outcome.kind == "remote":
            address = outcome.value or recipient.address
            if address == recipient.address:
                return None
            try:
                address, _ = normalise_mailbox(address)
            except AddressError:
                log.error("session=%s verifier rewrote <%s> to an invalid address %r", session.id,
                          recipient.address, address)
                return Verdict.deny_soft(CANNOT_VERIFY, code=450, enhanced="4.3.0",
                                         reason="verifier returned an invalid address")
            # A decisive OK would skip the plugins after us (relay control); a CONT verdict
            # carries the rewrite to them (see the hook's contract).
            verdict = Verdict.ok if self.last else Verdict.cont
            return replace(verdict(), recipient=Recipient(address))
        return _refusal(outcome)

    @hookimpl
    async def on_vrfy(self, session: Session, address: str) -> Verdict | None:
        """VRFY, when ``[verifier] vrfy`` is on: 250 with the full name for a local mailbox, 252 for
        an address that would be accepted, 550/450 as for RCPT."""
        if not self.vrfy:
            return None
        outcome = await self._ask(session, address, "")
        if outcome.kind == "local":
            return Verdict.ok(outcome.full_name or outcome.value, code=250, enhanced="2.1.5")
        if outcome.kind == "remote":
            return Verdict.ok(f"cannot verify but will accept: {outcome.value or address}", code=252,
                              enhanced="2.1.5")
        return _refusal(outcome)


def _refusal(outcome: Outcome) -> Verdict:
    if outcome.kind == "abort":
        return Verdict.disconnect("Closing connection", reason="address verifier abort")
    if outcome.kind == "temporary":
        return Verdict.deny_soft(outcome.text, code=450, enhanced="4.3.0" if outcome.broken else "4.2.0",
                                 reason=outcome.reason)
    return Verdict.deny(outcome.text, code=550, enhanced="5.1.1", reason=outcome.reason)
