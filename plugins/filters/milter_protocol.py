"""The Sendmail milter protocol, version 6, as the MTA speaks it.

A packet is a 4-byte big-endian length, a command byte and its data (NUL-terminated strings,
32-bit integers). Option negotiation (``O``) settles the edits the milter may make, the steps it
does not want (``SMFIP_NO*``) or will not answer (``SMFIP_NR_*``) and the macros it wants. Then
per message: connect, HELO, MAIL, RCPT..., DATA, headers, end of headers, body chunks, end of
message, each step after its macros (``D``). The milter may decide at any step; at the end of
the message it may first ask for edits (headers, body, recipients, sender, quarantine).

:func:`converse` takes a :class:`MilterRequest` and returns an :class:`Outcome`, or raises
:class:`MilterError` (``OSError`` when unreachable); time limits are the caller's. The wire
format follows Postfix and Sendmail: folded header lines joined by LF, one space after the
colon dropped unless the milter asks for ``SMFIP_HDR_LEADSPC``, body lines with CRLF.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import re
import struct
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Mapping

log = logging.getLogger("mailrelay.filters")

VERSION = 6
CHUNK = 65535                 # body bytes per SMFIC_BODY packet (MILTER_CHUNK_SIZE)
MAX_PACKET = 4 * 1024 * 1024  # a longer packet is a broken milter, not an answer
MAX_BODY = 256 * 1024 * 1024  # replacement body, all chunks together

# MTA -> milter
ABORT, BODY, CONNECT, MACRO, EOM, HELO = b"A", b"B", b"C", b"D", b"E", b"H"
HEADER, MAIL, EOH, OPTNEG, QUIT, RCPT, DATA = b"L", b"M", b"N", b"O", b"Q", b"R", b"T"
# milter -> MTA: decisions
ACCEPT, CONTINUE, DISCARD, REJECT, TEMPFAIL, REPLYCODE = b"a", b"c", b"d", b"r", b"t", b"y"
PROGRESS, SKIP, SHUTDOWN, CONN_FAIL, QUARANTINE = b"p", b"s", b"4", b"f", b"q"
# milter -> MTA: edits at the end of the message
ADDHEADER, CHGHEADER, INSHEADER, REPLBODY = b"h", b"m", b"i", b"b"
ADDRCPT, ADDRCPT_PAR, DELRCPT, CHGFROM = b"+", b"2", b"-", b"e"

# SMFIF_*: the edits a milter may ask for; we allow all of them.
F_ADDHDRS, F_CHGBODY, F_ADDRCPT, F_DELRCPT = 0x01, 0x02, 0x04, 0x08
F_CHGHDRS, F_QUARANTINE, F_CHGFROM, F_ADDRCPT_PAR, F_SETSYMLIST = 0x10, 0x20, 0x40, 0x80, 0x100
ACTIONS = 0x1FF
_EDIT_FLAG = {ADDHEADER: F_ADDHDRS, INSHEADER: F_ADDHDRS, CHGHEADER: F_CHGHDRS, REPLBODY: F_CHGBODY,
              ADDRCPT: F_ADDRCPT, ADDRCPT_PAR: F_ADDRCPT_PAR, DELRCPT: F_DELRCPT, CHGFROM: F_CHGFROM,
              QUARANTINE: F_QUARANTINE}

# SMFIP_*: steps the milter can do without (NO*), replies it can leave out (NR_*).
P_NOCONNECT, P_NOHELO, P_NOMAIL, P_NORCPT, P_NOBODY, P_NOHDRS, P_NOEOH = 0x1, 0x2, 0x4, 0x8, 0x10, 0x20, 0x40
P_NR_HDR, P_NOUNKNOWN, P_NODATA, P_SKIP, P_RCPT_REJ = 0x80, 0x100, 0x200, 0x400, 0x800
P_NR_CONN, P_NR_HELO, P_NR_MAIL, P_NR_RCPT = 0x1000, 0x2000, 0x4000, 0x8000
P_NR_DATA, P_NR_UNKN, P_NR_EOH, P_NR_BODY, P_HDR_LEADSPC = 0x10000, 0x20000, 0x40000, 0x80000, 0x100000
# Everything but RCPT_REJ (recipients refused at RCPT never reach the filters) and the big-packet
# extensions (we send 64 KiB chunks).
PROTOCOL = 0x1FFFFF & ~P_RCPT_REJ

# Each step's flags: the milter does not want it (NO*), it will not answer it (NR_*).
_STEPS: dict[bytes, tuple[int, int]] = {
    CONNECT: (P_NOCONNECT, P_NR_CONN), HELO: (P_NOHELO, P_NR_HELO), MAIL: (P_NOMAIL, P_NR_MAIL),
    RCPT: (P_NORCPT, P_NR_RCPT), DATA: (P_NODATA, P_NR_DATA), HEADER: (P_NOHDRS, P_NR_HDR),
    EOH: (P_NOEOH, P_NR_EOH), BODY: (P_NOBODY, P_NR_BODY), EOM: (0, 0),
}
_STAGE_COMMAND = {0: CONNECT, 1: HELO, 2: MAIL, 3: RCPT, 4: DATA, 5: EOM, 6: EOH}  # SMFIM_* numbers
STEP_NAMES = {CONNECT: "connect", HELO: "helo", MAIL: "mail", RCPT: "rcpt", DATA: "data",
              HEADER: "header", EOH: "eoh", BODY: "body", EOM: "eom"}
_REPLY_LINE = re.compile(r"([45])(\d\d)([ -])(?:(\d{1,3}\.\d{1,3}\.\d{1,3})(?: |$))?(.*)")


class MilterError(Exception):
    """The milter cannot be reached, broke the protocol or closed the connection."""


class Decision(enum.Enum):
    CONTINUE = "continue"   # no objection (at the end of the message: accept, with the edits)
    ACCEPT = "accept"       # accept without further steps (and without edits)
    REJECT = "reject"
    TEMPFAIL = "tempfail"
    DISCARD = "discard"     # accept and drop


_DECISIONS = {ACCEPT: Decision.ACCEPT, DISCARD: Decision.DISCARD, REJECT: Decision.REJECT,
              TEMPFAIL: Decision.TEMPFAIL}


@dataclass(frozen=True)
class Edit:
    """One edit asked for at the end of the message, in the order the milter sent it.

    ``kind`` is ``add_header``, ``insert_header`` (``index`` 0 is the top), ``change_header``
    (``index`` 1 is the first header of that name; an empty ``value`` deletes it),
    ``replace_body``, ``add_rcpt``, ``delete_rcpt`` or ``change_from``. ``line`` is the header
    field as the milter means it, ``name: value`` without the final CRLF.
    """

    kind: str
    name: bytes = b""
    value: bytes = b""
    index: int = 0
    line: bytes = b""
    address: str = ""
    args: str = ""


@dataclass
class Outcome:
    """The milter's answer: its decision, the step it came at, the reply it chose, its edits."""

    decision: Decision
    step: str
    code: int = 0
    enhanced: str = ""
    text: str = ""
    edits: list[Edit] = field(default_factory=list)
    quarantine: str | None = None


@dataclass(frozen=True)
class MilterRequest:
    """What the MTA tells a milter about one message.

    ``family`` is ``"4"``, ``"6"``, ``"L"`` (unix socket) or ``"U"`` (unknown); ``headers`` are
    (name, raw value) pairs, the raw value being everything after the colon with its folding
    CRLFs and without the final CRLF; ``macros`` maps a command byte (``CONNECT``, ``MAIL``...)
    to the macros sent before it; ``rcpt_macros`` gives each recipient its own.
    """

    client_name: str
    family: str
    client_port: int
    client_address: str
    helo: str
    sender: str
    sender_args: tuple[str, ...]
    recipients: tuple[str, ...]
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    macros: Mapping[bytes, Mapping[str, str]] = field(default_factory=dict)
    rcpt_macros: tuple[Mapping[str, str], ...] = ()


def packet(command: bytes, data: bytes = b"") -> bytes:
    """One packet on the wire."""
    return struct.pack(">I", len(data) + 1) + command + data


def cstrings(*items: str | bytes) -> bytes:
    """NUL-terminated strings, as every string in the protocol is sent."""
    return b"".join((i.encode("utf-8", "surrogateescape") if isinstance(i, str) else i).replace(b"\0", b" ")
                    + b"\0" for i in items)


def split_strings(data: bytes, count: int, what: str, *, optional: int = 0) -> list[bytes]:
    """The first ``count`` NUL-terminated strings of ``data`` (``optional`` more may be absent)."""
    parts = data.split(b"\0")
    if parts and parts[-1] == b"":
        parts.pop()
    if not count <= len(parts) <= count + optional:
        raise MilterError(f"malformed {what} request")
    return parts + [b""] * (count + optional - len(parts))


def header_line(name: bytes, value: bytes, leading_space: bool) -> bytes:
    """A header field from a milter's name and value: one space after the colon unless the milter
    sends its own (``SMFIP_HDR_LEADSPC``), folding lines joined by CRLF, each continuation line
    starting with white space and none of them empty (an empty line would end the header)."""
    lines = value.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    first, rest = lines[0], [ln for ln in lines[1:] if ln.strip()]
    rest = [ln if ln[:1] in (b" ", b"\t") else b"\t" + ln for ln in rest]
    return b"\r\n".join([name + b":" + (b"" if leading_space else b" ") + first, *rest])


def parse_reply(data: bytes) -> tuple[int, str, str]:
    """An ``SMFIR_REPLYCODE`` text (one or more ``NNN[- ]x.y.z text`` lines) to code, enhanced
    code and one line of text. Sendmail doubles ``%``; a lone one is dropped, as Postfix does."""
    text = data.rstrip(b"\0").decode("utf-8", "replace")
    text = re.sub(r"%(.?)", r"\1", text)
    code, enhanced, words = 0, "", []
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line:
            continue
        match = _REPLY_LINE.fullmatch(line)
        if match is None or (code and int(match.group(1) + match.group(2)) != code):
            raise MilterError(f"malformed reply code {text[:80]!r}")
        code = int(match.group(1) + match.group(2))
        if match.group(4) and not enhanced:
            enhanced = match.group(4)
        if match.group(5).strip():
            words.append(match.group(5).strip())
    if not code:
        raise MilterError("empty reply code")
    if enhanced and enhanced[0] != str(code)[0]:
        enhanced = ""
    return code, enhanced or f"{code // 100}.7.1", " ".join(words)


class Conversation:
    """One connection to a milter, for one message."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.actions = self.protocol = 0
        self.wanted: dict[bytes, set[str]] = {}  # macro names per command, when the milter chose
        self.started = False                     # a message is under way (ABORT before QUIT)

    # ---------------------------------------------------------------- wire
    def send(self, command: bytes, data: bytes = b"") -> None:
        self.writer.write(packet(command, data))

    async def receive(self) -> tuple[bytes, bytes]:
        await self.writer.drain()
        try:
            head = await self.reader.readexactly(4)
            (length,) = struct.unpack(">I", head)
            if not 1 <= length <= MAX_PACKET:
                raise MilterError(f"bad packet length {length}")
            data = await self.reader.readexactly(length)
        except asyncio.IncompleteReadError:
            raise MilterError("the milter closed the connection") from None
        return data[:1], data[1:]

    # ---------------------------------------------------------------- negotiation
    async def negotiate(self) -> None:
        self.send(OPTNEG, struct.pack(">III", VERSION, ACTIONS, PROTOCOL))
        command, data = await self.receive()
        if command != OPTNEG or len(data) < 12:
            raise MilterError(f"unexpected answer {command!r} to option negotiation")
        version, actions, protocol = struct.unpack(">III", data[:12])
        if not 2 <= version <= VERSION:
            raise MilterError(f"unsupported milter protocol version {version}")
        if actions & ~ACTIONS:
            raise MilterError(f"the milter asks for unknown edits 0x{actions:x}")
        self.actions, self.protocol = actions, protocol & PROTOCOL
        if version < 4:
            self.protocol |= P_NODATA  # DATA and NR_* came with later versions
        rest = data[12:]
        while len(rest) >= 4:  # SMFIR_SETSYMLIST: (stage, "name name ...") pairs
            (stage,) = struct.unpack(">I", rest[:4])
            names, _, rest = rest[4:].partition(b"\0")
            if stage in _STAGE_COMMAND:
                self.wanted[_STAGE_COMMAND[stage]] = {
                    n.strip("{}") for n in names.decode("ascii", "replace").split()}

    # ---------------------------------------------------------------- steps
    async def step(self, command: bytes, data: bytes = b"", macros: Mapping[str, str] | None = None,
                   ) -> Outcome | None:
        """Send one step (with its macros); the milter's decision, or None to carry on."""
        no_flag, reply_flag = _STEPS[command]
        if macros:
            wanted = self.wanted.get(command)
            pairs = [(n, v) for n, v in macros.items() if wanted is None or n.strip("{}") in wanted]
            if pairs:
                self.send(MACRO, command + cstrings(*[s for pair in pairs for s in pair]))
        if self.protocol & no_flag:
            return None
        self.send(command, data)
        if self.protocol & reply_flag:
            return None
        return await self.answer(command)

    async def answer(self, command: bytes) -> Outcome | None:
        """Read replies to ``command`` up to a decision; edits are collected at the end of message."""
        step = STEP_NAMES[command]
        edits: list[Edit] = []
        quarantine: str | None = None
        body: list[bytes] = []
        body_size = 0
        while True:
            reply, data = await self.receive()
            if reply == PROGRESS:
                continue
            if reply in (CONTINUE, ACCEPT, REJECT, TEMPFAIL, DISCARD, REPLYCODE, SKIP):
                if body:
                    edits.append(Edit("replace_body", value=b"".join(body)))
                outcome = self._decision(command, reply, data, step)
                if outcome is None and (edits or quarantine is not None):
                    outcome = Outcome(Decision.CONTINUE, step)
                if outcome is not None:
                    outcome.edits, outcome.quarantine = edits, quarantine
                return outcome
            if reply in (SHUTDOWN, CONN_FAIL):
                raise MilterError("the milter is shutting down" if reply == SHUTDOWN else "the milter failed")
            if reply == QUARANTINE:
                self._allowed(reply, command)
                quarantine = data.rstrip(b"\0").decode("utf-8", "replace") or "quarantined by milter"
                continue
            self._allowed(reply, command)
            if reply == REPLBODY:
                body_size += len(data)
                if body_size > MAX_BODY:
                    raise MilterError("replacement body too large")
                body.append(data)
                continue
            if body:  # a body replacement ends at the first other request
                edits.append(Edit("replace_body", value=b"".join(body)))
                body = []
            edits.append(self._edit(reply, data))

    def _allowed(self, reply: bytes, command: bytes) -> None:
        if command != EOM:
            raise MilterError(f"edit request {reply!r} before the end of the message")
        if not self.actions & _EDIT_FLAG[reply]:
            raise MilterError(f"edit request {reply!r} the milter did not negotiate")

    def _decision(self, command: bytes, reply: bytes, data: bytes, step: str) -> Outcome | None:
        if reply != REPLYCODE and data.strip(b"\0"):
            raise MilterError(f"reply {reply!r} with unexpected data")
        if reply == CONTINUE:
            return None
        if reply == SKIP:
            if command != BODY:
                raise MilterError(f"skip at the {step} step")
            return Outcome(Decision.CONTINUE, "skip")
        if reply == DISCARD and command in (CONNECT, HELO):  # not allowed there; Sendmail and Postfix go on
            log.warning("milter asked to discard at the %s step; ignored", step)
            return None
        if reply in _DECISIONS:
            return Outcome(_DECISIONS[reply], step)
        code, enhanced, text = parse_reply(data)
        return Outcome(Decision.REJECT if code >= 500 else Decision.TEMPFAIL, step, code, enhanced, text)

    def _edit(self, reply: bytes, data: bytes) -> Edit:
        leading = bool(self.protocol & P_HDR_LEADSPC)
        if reply == ADDHEADER:
            name, value = split_strings(data, 2, "add header")
            return Edit("add_header", name, value, line=_checked(name, header_line(name, value, leading)))
        if reply in (CHGHEADER, INSHEADER):
            if len(data) < 4:
                raise MilterError("malformed header request")
            (index,) = struct.unpack(">I", data[:4])
            name, value = split_strings(data[4:], 2, "header")
            if reply == INSHEADER:
                return Edit("insert_header", name, value, index,
                            line=_checked(name, header_line(name, value, leading)))
            line = _checked(name, header_line(name, value, leading)) if value else b""
            return Edit("change_header", name, value, max(index, 1), line=line)
        if reply in (ADDRCPT, ADDRCPT_PAR, CHGFROM):
            parts = split_strings(data, 1, "address", optional=0 if reply == ADDRCPT else 1)
            address, args = parts[0], parts[1] if len(parts) > 1 else b""
            kind = "change_from" if reply == CHGFROM else "add_rcpt"
            return Edit(kind, address=_address(address, null=reply == CHGFROM),
                        args=args.decode("utf-8", "replace"))
        (address,) = split_strings(data, 1, "delete recipient")
        return Edit("delete_rcpt", address=_address(address, null=False))

    # ---------------------------------------------------------------- the message
    async def run(self, request: MilterRequest) -> Outcome:
        """Walk one message through every step until the milter decides."""
        macros = request.macros
        family = request.family
        connect = cstrings(request.client_name) + family.encode()
        if family in ("4", "6", "L"):
            connect += struct.pack(">H", request.client_port) + cstrings(request.client_address)
        leading = bool(self.protocol & P_HDR_LEADSPC)
        steps: list[tuple[bytes, bytes, Mapping[str, str] | None]] = [(CONNECT, connect, macros.get(CONNECT))]
        if request.helo:
            steps.append((HELO, cstrings(request.helo), macros.get(HELO)))
        steps.append((MAIL, cstrings(f"<{request.sender}>", *request.sender_args), macros.get(MAIL)))
        self.started = True
        for i, recipient in enumerate(request.recipients):
            own = request.rcpt_macros[i] if i < len(request.rcpt_macros) else macros.get(RCPT)
            steps.append((RCPT, cstrings(f"<{recipient}>"), own))
        steps.append((DATA, b"", macros.get(DATA)))
        for name, raw in request.headers:
            value = raw.replace(b"\r\n", b"\n")
            if not leading and value.startswith(b" "):
                value = value[1:]
            steps.append((HEADER, cstrings(name, value), None))
        steps.append((EOH, b"", macros.get(EOH)))
        for command, data, step_macros in steps:
            outcome = await self.step(command, data, step_macros)
            if outcome is not None:
                return outcome
        body = request.body
        for start in range(0, len(body), CHUNK):
            outcome = await self.step(BODY, body[start:start + CHUNK])
            if outcome is not None:
                if outcome.step == "skip":
                    break
                return outcome
        outcome = await self.step(EOM, b"", macros.get(EOM))
        return outcome or Outcome(Decision.CONTINUE, "eom")

    def close(self, *, finished: bool) -> None:
        """Say goodbye (``ABORT`` first unless the message got to its end) and hang up."""
        try:
            if self.started and not finished:
                self.send(ABORT)
            self.send(QUIT)
            if self.writer.transport.get_write_buffer_size() > 64:
                self.writer.transport.abort()  # a milter that does not read: do not wait for it
            else:
                self.writer.close()
        except (OSError, RuntimeError):
            self.writer.transport.abort()


def _checked(name: bytes, line: bytes) -> bytes:
    if not name or not re.fullmatch(rb"[\x21-\x39\x3b-\x7e]+", name):
        raise MilterError(f"bad header name {name[:40]!r}")
    return line


def _address(raw: bytes, *, null: bool) -> str:
    """An address from a milter, without its angle brackets; ``<>`` only as a sender (``null``)."""
    text = raw.decode("utf-8", "replace").strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    if any(ch in text for ch in "\r\n\0<> \t") or len(text) > 512 or (not text and not null):
        raise MilterError(f"bad address {text[:60]!r}")
    return text


Connector = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


async def converse(connect: Connector, request: MilterRequest) -> Outcome:
    """Connect, negotiate, send the message, and return the milter's outcome.

    The connection is closed afterwards whatever happens (``ABORT``/``QUIT`` when possible);
    failures to connect come out as ``OSError``, protocol trouble as :class:`MilterError`.
    """
    reader, writer = await connect()
    conversation = Conversation(reader, writer)
    finished = False
    try:
        await conversation.negotiate()
        outcome = await conversation.run(request)
        finished = outcome.step == "eom"
        return outcome
    finally:
        conversation.close(finished=finished)
