"""The data that crosses the boundary between the core and plugins.

Verdicts use the vocabulary that Haraka, qpsmtpd and friends share (CONT, OK, DENY, DENYSOFT,
DISCONNECT, DISCARD, QUARANTINE); each carries the SMTP reply the client will see.
"""

from __future__ import annotations

import enum
import ipaddress
import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

__all__ = [
    "Action", "Verdict", "Recipient", "Session", "Transaction", "FilterAction", "FilterResult",
    "Route", "DeliveryResult", "Event", "Stage",
]

Stage = Literal["server", "client"]


class Action(enum.Enum):
    """What a decision hook wants done."""

    CONT = "cont"              # no opinion: ask the next plugin
    OK = "ok"                  # accept, and ask no further plugin
    DENY = "deny"              # permanent rejection (5xx)
    DENYSOFT = "denysoft"      # temporary rejection (4xx)
    DISCONNECT = "disconnect"  # reply (421 by default) and drop the connection
    DISCARD = "discard"        # pretend to accept, then drop the message
    QUARANTINE = "quarantine"  # accept, but hold the message instead of forwarding it


_DEFAULT_REPLY: dict[Action, tuple[int, str, str]] = {
    Action.CONT: (250, "2.0.0", "OK"),
    Action.OK: (250, "2.0.0", "OK"),
    Action.DENY: (550, "5.7.1", "Rejected by policy"),
    Action.DENYSOFT: (451, "4.7.1", "Temporarily rejected, try again later"),
    Action.DISCONNECT: (421, "4.7.0", "Closing connection"),
    Action.DISCARD: (250, "2.0.0", "OK"),
    Action.QUARANTINE: (250, "2.0.0", "OK"),
}


@dataclass(frozen=True)
class Recipient:
    """One envelope recipient: remote (to be forwarded) or local (a mailbox name).

    ``mailbox`` is set for local recipients; it is what E-MailRelay writes as ``To-Local``.
    """

    address: str
    mailbox: str | None = None

    @property
    def is_local(self) -> bool:
        return self.mailbox is not None

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2].lower()

    @classmethod
    def local(cls, address: str, mailbox: str) -> "Recipient":
        return cls(address, mailbox)


@dataclass(frozen=True)
class Verdict:
    """A plugin's answer to a decision hook, with the SMTP reply that goes with it.

    ``recipient`` lets ``on_rcpt_to`` replace the recipient (rewrite, or mark it local);
    ``reason`` is for logs and quarantine records and is never shown to the client.
    """

    action: Action
    code: int
    enhanced: str
    text: str
    recipient: Recipient | None = None
    reason: str = ""

    @property
    def decisive(self) -> bool:
        return self.action is not Action.CONT

    @property
    def accepted(self) -> bool:
        return self.action in (Action.CONT, Action.OK, Action.DISCARD, Action.QUARANTINE)

    def reply(self) -> str:
        """The SMTP reply line(s), RFC 3463 enhanced code included."""
        lines = self.text.splitlines() or [""]
        out = []
        for i, line in enumerate(lines):
            sep = "-" if i < len(lines) - 1 else " "
            out.append(f"{self.code}{sep}{self.enhanced} {line}".rstrip())
        return "\r\n".join(out)

    @classmethod
    def _make(cls, action: Action, text: str | None, code: int | None, enhanced: str | None,
              **kw: Any) -> "Verdict":
        d_code, d_enh, d_text = _DEFAULT_REPLY[action]
        code = d_code if code is None else code
        _check_code(action, code)
        return cls(action, code, enhanced or _enhanced_for(code, d_enh), text or d_text, **kw)

    @classmethod
    def cont(cls, *, recipient: Recipient | None = None) -> "Verdict":
        if recipient is None and cls is Verdict:
            return _CONTINUE  # the commonest answer of all: one shared (frozen) instance
        return cls._make(Action.CONT, None, None, None, recipient=recipient)

    @classmethod
    def ok(cls, text: str | None = None, *, code: int | None = None, enhanced: str | None = None,
           recipient: Recipient | None = None) -> "Verdict":
        return cls._make(Action.OK, text, code, enhanced, recipient=recipient)

    @classmethod
    def deny(cls, text: str | None = None, *, code: int | None = None,
             enhanced: str | None = None, reason: str = "") -> "Verdict":
        return cls._make(Action.DENY, text, code, enhanced, reason=reason)

    @classmethod
    def deny_soft(cls, text: str | None = None, *, code: int | None = None,
                  enhanced: str | None = None, reason: str = "") -> "Verdict":
        return cls._make(Action.DENYSOFT, text, code, enhanced, reason=reason)

    @classmethod
    def disconnect(cls, text: str | None = None, *, code: int | None = None,
                   enhanced: str | None = None, reason: str = "") -> "Verdict":
        return cls._make(Action.DISCONNECT, text, code, enhanced, reason=reason)

    @classmethod
    def discard(cls, reason: str = "") -> "Verdict":
        return cls._make(Action.DISCARD, None, None, None, reason=reason)

    @classmethod
    def quarantine(cls, reason: str) -> "Verdict":
        return cls._make(Action.QUARANTINE, None, None, None, reason=reason)


def _check_code(action: Action, code: int) -> None:
    wanted = {Action.DENY: 5, Action.DENYSOFT: 4, Action.DISCONNECT: 4}.get(action, 2)
    if not 200 <= code <= 599 or code // 100 != wanted:
        raise ValueError(f"reply code {code} does not fit verdict {action.name}")


def _enhanced_for(code: int, default: str) -> str:
    # Keep the class digit of the enhanced code consistent with the reply code.
    return f"{code // 100}{default[1:]}"


_CONTINUE = Verdict._make(Action.CONT, None, None, None)
_session_ids = itertools.count(1)


@dataclass
class Transaction:
    """One MAIL..DATA transaction inside a session. ``notes`` is for plugins."""

    sender: str
    body: Literal["7bit", "8bit", "unknown"] = "unknown"
    smtputf8: bool = False
    size_hint: int | None = None
    auth_param: str = ""
    recipients: list[Recipient] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)
    discard: bool = False
    quarantine_reason: str = ""


@dataclass
class Session:
    """One client connection. ``notes`` is shared by plugins for the connection's lifetime."""

    peer_ip: str
    peer_port: int
    local_ip: str = ""
    local_port: int = 0
    id: str = field(default_factory=lambda: f"s{next(_session_ids)}")
    started: float = field(default_factory=time.time)
    helo: str = ""
    esmtp: bool = False
    tls: bool = False
    tls_cipher: str = ""
    client_certificate: str = ""
    auth_user: str = ""
    auth_mechanism: str = ""      # PLAIN, LOGIN, CRAM-MD5 once authenticated
    notes: dict[str, Any] = field(default_factory=dict)
    transaction: Transaction | None = None

    @property
    def is_loopback(self) -> bool:
        try:
            return ipaddress.ip_address(self.peer_ip.split("%")[0]).is_loopback
        except ValueError:  # a Unix socket peer has no address: it is local
            return True


class FilterAction(enum.Enum):
    """Outcome of a filter, mirroring E-MailRelay's filter exit codes."""

    OK = "ok"            # carry on (0, 101)
    REJECT = "reject"    # refuse the message (1-99)
    ABANDON = "abandon"  # the filter has taken the message: acknowledge, do not forward (100)
    FAIL = "fail"        # temporary failure (4xx / client-stage failure)


@dataclass(frozen=True)
class FilterResult:
    """What ``on_filter`` returns: the action, the reply for rejections, and side effects.

    ``content`` replaces the message content when not None (an edited message).
    ``rescan`` asks the queue runner to rescan the spool; ``stop_scanning`` to stop (client stage).
    ``reason`` is a detail for the log only (E-MailRelay's second ``<<...>>`` line); ``text`` is
    what the SMTP client or the bounce sees.
    """

    action: FilterAction = FilterAction.OK
    code: int | None = None
    enhanced: str | None = None
    text: str = ""
    content: bytes | None = None
    rescan: bool = False
    stop_scanning: bool = False
    reason: str = ""

    @classmethod
    def ok(cls, content: bytes | None = None) -> "FilterResult":
        return cls(FilterAction.OK, content=content)

    @classmethod
    def reject(cls, text: str, code: int = 550, enhanced: str | None = None, *, reason: str = "") -> "FilterResult":
        return cls(FilterAction.REJECT, code, enhanced or f"{code // 100}.7.1", text, reason=reason)

    @classmethod
    def abandon(cls) -> "FilterResult":
        return cls(FilterAction.ABANDON)

    @classmethod
    def fail(cls, text: str, code: int = 451, enhanced: str | None = None, *, reason: str = "") -> "FilterResult":
        return cls(FilterAction.FAIL, code, enhanced or f"{code // 100}.3.0", text, reason=reason)


@dataclass(frozen=True)
class Route:
    """Where one recipient goes: ``kind`` is smarthost, mx, local or drop."""

    kind: Literal["smarthost", "mx", "local", "drop"]
    destination: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DeliveryResult:
    """Outcome for one recipient of a delivery attempt."""

    recipient: Recipient
    status: Literal["ok", "temp", "perm"]
    code: int = 250
    text: str = ""


@dataclass(frozen=True)
class Event:
    """Something that happened, for observers (logs, metrics, webhooks)."""

    name: str
    message_id: str = ""
    session_id: str = ""
    data: Mapping[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)
