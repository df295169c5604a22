"""The filter contract shared by the core, the ``filters`` plugin and every filter kind.

A filter spec is E-MailRelay's ``scheme:argument`` text (``spam:127.0.0.1:783``, ``exit:100``) or a
plain program path. The plugin that claims a scheme (``relay_filter_factory``) turns a
:class:`FilterSpec` into a :class:`Filter`; the ``filters`` plugin runs the configured chains.

E-MailRelay's exit-code contract lives here too, because every kind that wraps a program or
imitates one (``exit:``, ``pipe:``, ``so:``) answers in those terms.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from .config.loader import ConfigError
from .types import FilterAction, FilterResult, Stage

if TYPE_CHECKING:  # pragma: no cover
    from .message import Message

__all__ = ["Filter", "FilterSpec", "FilterSpecError", "parse_filter_specs", "split_spec",
           "result_from_exit", "parse_reason", "ExitReason", "PROGRAM_SCHEME"]

PROGRAM_SCHEME = "file"  # a plain path; ``file:PATH`` says the same explicitly
_SCHEME_RE = re.compile(r"([a-z][a-z0-9-]*):(.*)", re.DOTALL)


class FilterSpecError(ConfigError):
    """A filter spec that no plugin can turn into a filter (unknown scheme, bad argument)."""


@dataclass(frozen=True)
class FilterSpec:
    """One configured filter: what the factory of its scheme receives.

    ``text`` is the spec as the operator wrote it; ``argument`` the part after ``scheme:``;
    ``timeout`` the ``--filter-timeout`` in seconds; ``relay`` the running relay, for settings
    (``relay.settings.spool.dir``, ``relay.plugin_settings("filters").delivery_dir``), the spool
    and the DNS resolver.
    """

    text: str
    scheme: str
    argument: str
    stage: Stage
    timeout: float = 60.0
    relay: Any = field(default=None, compare=False, repr=False)


@runtime_checkable
class Filter(Protocol):
    """A filter object. ``name`` appears in logs and ``filter.done`` events.

    ``await filter(message, stage)`` returns a :class:`FilterResult`. The message's files are
    ``message.content_path`` and ``message.envelope_path`` (``.envelope.new`` at the server stage,
    ``.envelope.busy`` at the client stage). A filter that edits those files directly sets the
    class attribute ``edits_files = True`` so that the chain reloads them afterwards; a filter
    that returns ``FilterResult.content`` has the chain write the new content for it. A filter
    that reads only ``message`` (never the files) sets ``in_memory = True``, so that an edit made
    by the filter before it need not reach the disk first.
    An optional ``async aclose()`` releases connections and worker processes at shutdown.
    """

    name: str

    async def __call__(self, message: Message, stage: Stage) -> FilterResult: ...


def split_spec(text: str) -> tuple[str, str]:
    """``"spam:127.0.0.1:783"`` to ``("spam", "127.0.0.1:783")``; a plain path is the program
    scheme. A path is anything starting with ``/`` or ``.``, or without a ``scheme:`` prefix."""
    text = text.strip()
    if not text:
        raise FilterSpecError("empty filter spec")
    if text.startswith(("/", ".")):
        return PROGRAM_SCHEME, text
    match = _SCHEME_RE.fullmatch(text)
    if match is None:
        return PROGRAM_SCHEME, text
    return match.group(1), match.group(2)


def parse_filter_specs(value: Any) -> list[str]:
    """A filter list as given: ``"a,b"`` (E-MailRelay's comma-separated chain) or a TOML list."""
    items = value if isinstance(value, (list, tuple)) else [value]
    out: list[str] = []
    for item in items:
        out += [part.strip() for part in str(item).split(",") if part.strip()]
    return out


# ---------------------------------------------------------------- E-MailRelay's exit codes
@dataclass(frozen=True)
class ExitReason:
    """The ``<<response>>`` / ``[[response]]`` lines of a filter's output.

    ``response`` is what the SMTP client sees, ``code`` a 4xx/5xx reply code the filter chose
    (0 when it chose none), ``reason`` the second line, for the log only.
    """

    response: str
    code: int = 0
    reason: str = ""


_PRINTABLE = re.compile(r"[^\x20-\x7e\u00a0-\uffff]")
MAX_OUTPUT_SCAN = 4096  # E-MailRelay looks at "the first few thousand characters"


def parse_reason(output: str | bytes, default: str = "rejected") -> ExitReason:
    """Find the response in a filter's standard output.

    Lines that start with ``<<`` and contain ``>>`` (or ``[[`` ... ``]]``) count; the first gives
    the response, the second (if any) the logged reason. A response starting with a 4xx/5xx
    number and a space gives the reply code. Non-printable characters are replaced, so nothing
    a filter prints can break the SMTP reply line.
    """
    if isinstance(output, bytes):
        output = output[:MAX_OUTPUT_SCAN].decode("utf-8", "replace")
    else:
        output = output[:MAX_OUTPUT_SCAN]
    lines = []
    for line in output.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        for start, end in (("<<", ">>"), ("[[", "]]")):
            if line.startswith(start):
                stop = line.find(end, len(start))
                if stop >= 0:
                    lines.append(_PRINTABLE.sub("?", line[len(start):stop]))
                    break
    response = lines[0] if lines and lines[0] else default
    code = 0
    if (len(response) >= 3 and response[0] in "45" and response[1:3].isdigit()
            and (len(response) == 3 or response[3] in " \t")):
        code = int(response[:3])
        response = response[4:] if len(response) > 3 else ""
        response = response or default
    reason = lines[1] if len(lines) > 1 and lines[1] else response
    return ExitReason(response, code, reason)


def result_from_exit(exit_code: int, stage: Stage, output: str | bytes = "", *,
                     reject_code: int = 550) -> FilterResult:
    """Map an E-MailRelay filter exit code (and its output) to a :class:`FilterResult`.

    0 and 101 ok; 1-99 reject, with the ``<<response>>`` text and code (``reject_code`` when the
    filter names none; 4xx codes make it a temporary failure); 100 abandon. Server stage:
    102 abandon + rescan, 103 ok + rescan, 104 fail + rescan. Client stage: 102 ok + stop
    scanning, 103 ok, 104 abandon + stop scanning, 105 fail + stop scanning. Anything else
    (a signal, 106-255) is a temporary failure: the filter broke, the message must not be lost.
    """
    if exit_code in (0, 101):
        return FilterResult.ok()
    if exit_code == 100:
        return FilterResult.abandon()
    if 1 <= exit_code <= 99:
        return _rejection(output, reject_code)
    if stage == "server":
        if exit_code == 102:
            return FilterResult(FilterAction.ABANDON, rescan=True)
        if exit_code == 103:
            return FilterResult(FilterAction.OK, rescan=True)
        if exit_code == 104:
            return _with_flags(_rejection(output, reject_code), rescan=True)
    else:
        if exit_code == 102:
            return FilterResult(FilterAction.OK, stop_scanning=True)
        if exit_code == 103:
            return FilterResult.ok()
        if exit_code == 104:
            return FilterResult(FilterAction.ABANDON, stop_scanning=True)
        if exit_code == 105:
            return _with_flags(_rejection(output, reject_code), stop_scanning=True)
    return FilterResult.fail(f"filter failed (exit {exit_code})" if exit_code >= 0
                             else f"filter killed by signal {-exit_code}")


def _rejection(output: str | bytes, reject_code: int) -> FilterResult:
    reason = parse_reason(output)
    code = reason.code or reject_code
    if code < 500:
        return FilterResult.fail(reason.response, code, f"{code // 100}.7.1", reason=reason.reason)
    return FilterResult.reject(reason.response, code, f"{code // 100}.7.1", reason=reason.reason)


def _with_flags(result: FilterResult, *, rescan: bool = False, stop_scanning: bool = False) -> FilterResult:
    return FilterResult(result.action, result.code, result.enhanced, result.text, result.content,
                        rescan or result.rescan, stop_scanning or result.stop_scanning, result.reason)
