"""``filter-program``: filters that are programs, in any language.

* A plain path (or ``file:PATH``): E-MailRelay's contract. The program runs with the content and
  envelope paths as its two arguments, E-MailRelay's reduced environment and no shell; it may edit
  both files; its exit code and ``<<response>>`` output decide (see ``mailrelay.filtering``).
* ``pipe:PATH``: the message on stdin and, on stdout, an edited message (or nothing: unchanged);
  the envelope in ``MAIL_FROM``, ``RCPT_TO`` (comma-separated), ``CLIENT_IP``, ``HELO``,
  ``AUTH_USER``, ``MESSAGE_ID`` and ``SPOOL_ID``. Same exit codes; a rejecting pipe filter's
  stdout is searched for ``<<response>>`` instead of being taken as the message.
"""

from __future__ import annotations

import logging
import os
import shlex
from pathlib import Path
from typing import Any, Callable

from mailrelay_sdk import FilterResult, Message, hookimpl

from mailrelay.filtering import FilterSpec, FilterSpecError, result_from_exit

from .process import MINIMAL_ENV, ProgramRun, run_program

log = logging.getLogger("mailrelay.filters")


def _program(spec: FilterSpec) -> list[str]:
    """The argv prefix of a spec. A path with spaces is one path (E-MailRelay's behaviour); no
    argument splitting, no shell. It must exist and be executable, or start-up stops."""
    path = spec.argument.strip()
    if not path:
        raise FilterSpecError(f"{spec.text!r}: no program given")
    resolved = Path(path).expanduser()
    if not resolved.is_absolute():
        resolved = Path.cwd() / resolved
    if not resolved.is_file() or not os.access(resolved, os.X_OK):
        raise FilterSpecError(f"filter program {path!r} is not an executable file")
    return [str(resolved)]


def _run_failed(name: str, run: ProgramRun, timeout: float) -> FilterResult | None:
    """A run that did not produce an exit code we can trust: a temporary failure, logged."""
    if run.error:
        log.error("filter=%s %s", name, run.error)
        return FilterResult.fail("Temporary local problem, please try again later", 451, "4.3.0",
                                 reason=run.error)
    if run.timed_out:
        log.warning("filter=%s timed out after %gs and was killed", name, timeout)
        return FilterResult.fail("Temporary local problem, please try again later", 451, "4.3.0",
                                 reason=f"filter timed out after {timeout:g}s")
    return None


class ProgramFilter:
    """A program run with the content and envelope paths (E-MailRelay's ``--filter=/path``)."""

    edits_files = True

    def __init__(self, spec: FilterSpec, reject_code: int = 550):
        self.argv = _program(spec)
        self.name = os.path.basename(self.argv[0])
        self.timeout = spec.timeout
        self.reject_code = reject_code

    async def __call__(self, message: Message, stage: Any) -> FilterResult:
        if message.content_path is None or message.envelope_path is None:
            return FilterResult.fail("Temporary local problem, please try again later", 451, "4.3.0",
                                     reason="message has no spool files")
        run = await run_program([*self.argv, str(message.content_path), str(message.envelope_path)],
                                env=dict(MINIMAL_ENV), timeout=self.timeout)
        return _run_failed(self.name, run, self.timeout) or _decide(self.name, run, stage, self.reject_code)


class PipeFilter:
    """``pipe:PATH``: message on stdin, edited message (or nothing) on stdout, envelope in the environment."""

    in_memory = True  # works on message.content only: no need to write edits to the file first

    def __init__(self, spec: FilterSpec, reject_code: int = 550, max_size: int = 0):
        self.argv = _program(spec)
        self.name = "pipe:" + os.path.basename(self.argv[0])
        self.timeout = spec.timeout
        self.reject_code = reject_code
        # An edited message may grow (added headers) but not without bound.
        self.max_output = (max_size or 256 << 20) + (1 << 20)

    async def __call__(self, message: Message, stage: Any) -> FilterResult:
        run = await run_program(self.argv, env={**MINIMAL_ENV, **envelope_environment(message)},
                                timeout=self.timeout, stdin=message.content, max_stdout=self.max_output)
        failed = _run_failed(self.name, run, self.timeout)
        if failed is not None:
            return failed
        result = _decide(self.name, run, stage, self.reject_code)
        if run.exit_code in (0, 101, 103) and run.stdout:
            if run.truncated:
                log.error("filter=%s wrote more than %d bytes; refusing its output", self.name, self.max_output)
                return FilterResult.fail("Temporary local problem, please try again later", 451, "4.3.0",
                                         reason="filter output too large")
            return FilterResult(result.action, content=to_crlf(run.stdout), rescan=result.rescan,
                                stop_scanning=result.stop_scanning)
        return result


def envelope_environment(message: Message) -> dict[str, str]:
    """The ``pipe:`` environment: envelope values as data, each a single line."""
    envelope = message.envelope
    session = message.session
    client = envelope.client
    if session is not None:
        client_ip = session.peer_ip
    else:  # E-MailRelay writes "address:port" (IPv6 in brackets)
        client_ip = client.rsplit(":", 1)[0].strip("[]") if ":" in client else client
    return {
        "MAIL_FROM": envelope.sender,
        "RCPT_TO": ",".join(r.address for r in envelope.recipients),
        "CLIENT_IP": client_ip,
        "HELO": (session.helo or "") if session is not None else "",
        "AUTH_USER": (session.auth_user or "") if session is not None and session.auth_user else
        (envelope.authentication or ""),
        "MESSAGE_ID": message.message_id,
        "SPOOL_ID": message.id,
    }


def to_crlf(data: bytes) -> bytes:
    """Spool content is CRLF; scripts often write bare LF."""
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _decide(name: str, run: ProgramRun, stage: Any, reject_code: int) -> FilterResult:
    result = result_from_exit(run.exit_code, stage, run.stdout, reject_code=reject_code)
    if run.exit_code not in (0, 101, 103):
        log.info("filter=%s exit=%d%s", name, run.exit_code,
                 f" stderr={shlex.quote(run.stderr[-300:].decode('utf-8', 'replace'))}" if run.stderr else "")
    return result


@hookimpl
def relay_filter_factory(register: Callable[[str, Callable[[FilterSpec], Any]], None]) -> None:
    def settings_of(spec: FilterSpec) -> tuple[int, int]:
        relay = spec.relay
        reject = relay.plugin_settings("filters").reject_code if relay is not None else 550
        size = relay.settings.smtp.size if relay is not None else 0
        return reject, size

    register("file", lambda spec: ProgramFilter(spec, settings_of(spec)[0]))
    register("pipe", lambda spec: PipeFilter(spec, *settings_of(spec)))
