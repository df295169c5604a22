"""``milter:``: the relay as the MTA side of the Sendmail milter protocol, against a scripted milter.

The milter here is written for the test from the protocol description (length-prefixed packets,
one command byte, NUL-terminated strings): it records everything the relay sends and answers
from a script, so each test can check what a milter is told and what the relay does with each
answer and edit. Real milters (OpenDKIM, rspamd) are in test_filter_milter_real.py.
"""

from __future__ import annotations

import smtplib
import socketserver
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import free_port, spooled_contents, submit, wait_until
from mailrelay.spool import Spool
from mailrelay_plugins.filters.milter import Content
from mailrelay_plugins.filters.milter_protocol import MilterError, parse_reply
from sinks import Sink
from smtpwire import Wire

HAM = (b"From: a@example.test\r\nTo: x@far.test\r\nSubject: hello\r\nMessage-ID: <m1@example.test>\r\n"
       b"\r\nplain text\r\n")
TEMPFAIL = (451, "4.3.0 Temporary local problem, please try again later")
NR = {b"C": 0x1000, b"H": 0x2000, b"M": 0x4000, b"R": 0x8000, b"T": 0x10000, b"L": 0x80, b"N": 0x40000,
      b"B": 0x80000}
NO_HELO, NR_HDR, HDR_LEADSPC = 0x2, 0x80, 0x100000


# ---------------------------------------------------------------- the milter side, by hand
def z(*strings: bytes) -> bytes:
    return b"".join(s + b"\0" for s in strings)


def add_header(name: bytes, value: bytes) -> tuple[bytes, bytes]:
    return b"h", z(name, value)


def change_header(index: int, name: bytes, value: bytes) -> tuple[bytes, bytes]:
    return b"m", struct.pack("!I", index) + z(name, value)


def insert_header(index: int, name: bytes, value: bytes) -> tuple[bytes, bytes]:
    return b"i", struct.pack("!I", index) + z(name, value)


def reply_code(text: bytes) -> tuple[bytes, bytes]:
    return b"y", z(text)


@dataclass
class Conversation:
    """What one connection brought: (command, data) in order, and the macros per command."""

    events: list[tuple[bytes, bytes]] = field(default_factory=list)
    macros: dict[bytes, list[dict[str, str]]] = field(default_factory=dict)

    def commands(self) -> bytes:
        return b"".join(c for c, _ in self.events)

    def data(self, command: bytes) -> list[bytes]:
        return [d for c, d in self.events if c == command]

    def strings(self, command: bytes) -> list[list[bytes]]:
        return [d.split(b"\0")[:-1] for d in self.data(command)]

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(n, v) for n, v in self.strings(b"L")]

    def macro(self, command: bytes, name: str) -> str | None:
        values = [m[name] for m in self.macros.get(command, []) if name in m]
        return values[-1] if values else None


class ScriptedMilter:
    """A milter on a loopback port (or a unix socket) that answers from a script.

    ``eom`` are the edit packets sent at the end of the message, before ``final`` (accept by
    default); ``replies`` overrides the answer for a command (``{b"R": reply_code(...)}``);
    ``hang_at`` / ``close_at`` make it stop answering, or hang up, when that command arrives.
    """

    def __init__(self, *, protocol: int = 0, actions: int = 0x1FF, unix_path: Path | None = None,
                 symlists: bytes = b""):
        self.protocol, self.actions, self.symlists = protocol, actions, symlists
        self.eom: list[tuple[bytes, bytes]] = []
        self.final: tuple[bytes, bytes] = (b"a", b"")
        self.replies: dict[bytes, tuple[bytes, bytes]] = {}
        self.hang_at: bytes | None = None
        self.close_at: bytes | None = None
        self.conversations: list[Conversation] = []
        self.negotiations: list[tuple[int, int, int]] = []
        self.unix_path = unix_path
        self.port = 0 if unix_path else free_port()
        self.release = threading.Event()
        self._server: socketserver.BaseServer | None = None

    @property
    def spec(self) -> str:
        return f"milter:unix:{self.unix_path}" if self.unix_path else f"milter:127.0.0.1:{self.port}"

    def start(self) -> "ScriptedMilter":
        owner = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                talk = Conversation()
                owner.conversations.append(talk)
                while True:
                    head = self.rfile.read(4)
                    if len(head) < 4:
                        return
                    packet = self.rfile.read(struct.unpack("!I", head)[0])
                    command, data = packet[:1], packet[1:]
                    if command == b"O":
                        owner.negotiations.append(struct.unpack("!III", data[:12]))
                        self.send(b"O", struct.pack("!III", 6, owner.actions, owner.protocol) + owner.symlists)
                        continue
                    if command == b"D":
                        items = data[1:].split(b"\0")[:-1]
                        pairs = dict(zip([i.decode() for i in items[::2]], [i.decode() for i in items[1::2]]))
                        talk.macros.setdefault(data[:1], []).append(pairs)
                        continue
                    talk.events.append((command, data))
                    if command == b"Q":
                        return
                    if command == owner.close_at:
                        return
                    if command == owner.hang_at:
                        owner.release.wait(60)
                        return
                    if command == b"A" or owner.protocol & NR.get(command, 0):
                        continue
                    if command == b"E":
                        for reply in owner.eom:
                            self.send(*reply)
                        self.send(*owner.final)
                    else:
                        self.send(*owner.replies.get(command, (b"c", b"")))

            def send(self, command: bytes, data: bytes = b"") -> None:
                self.wfile.write(struct.pack("!I", len(data) + 1) + command + data)
                self.wfile.flush()

        if self.unix_path:
            server: socketserver.BaseServer = socketserver.ThreadingUnixStreamServer(str(self.unix_path), Handler)
        else:
            socketserver.ThreadingTCPServer.allow_reuse_address = True
            server = socketserver.ThreadingTCPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True  # type: ignore[attr-defined]
        self._server = server
        threading.Thread(target=server.serve_forever, name="scripted-milter", daemon=True).start()
        return self

    def stop(self) -> None:
        self.release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def last(self) -> Conversation:
        return self.conversations[-1]


@pytest.fixture
def milter():
    started: list[ScriptedMilter] = []

    def start(**kw) -> ScriptedMilter:
        server = ScriptedMilter(**kw).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def target():
    sink = Sink(free_port()).start()
    yield sink
    sink.stop()


def only_message(relay) -> tuple[str, bytes, Spool]:
    spool = Spool(relay.spool)
    [message_id] = spool.ids()
    return message_id, spool.read_content(message_id), spool


# ---------------------------------------------------------------- what the milter is told
def test_the_milter_is_told_the_client_envelope_headers_and_body_in_chunks(relay_process, milter):
    server = milter()
    relay = relay_process("--filter", server.spec)
    body = b"".join(b"line %06d of a long body\r\n" % i for i in range(6000))  # ~150 KB: three chunks
    content = (b"From: a@example.test\r\nTo: x@far.test\r\nSubject: folded\r\n and continued\r\n"
               b"X-Empty:\r\n\r\n" + body)
    with smtplib.SMTP("127.0.0.1", relay.port, local_hostname="client.test") as client:
        client_port = client.sock.getsockname()[1]
        assert client.sendmail("a@example.test", ["x@far.test", "y@far.test"], content,
                               mail_options=["BODY=8BITMIME"]) == {}
    message_id, spooled, _ = only_message(relay)
    assert server.negotiations == [(6, 0x1FF, server.negotiations[0][2])]
    talk = server.last
    assert talk.commands() == b"CHMRRTLLLLN" + b"B" * 3 + b"EQ"  # no ABORT: the message got to its end
    name, rest = talk.data(b"C")[0].split(b"\0", 1)
    assert name == b"[127.0.0.1]" and rest[:1] == b"4"
    assert struct.unpack("!H", rest[1:3])[0] == client_port and rest[3:] == b"127.0.0.1\0"
    assert talk.strings(b"H") == [[b"client.test"]]
    [mail] = talk.strings(b"M")
    assert mail[0] == b"<a@example.test>" and b"BODY=8BITMIME" in mail and any(a.startswith(b"SIZE=") for a in mail)
    assert talk.strings(b"R") == [[b"<x@far.test>"], [b"<y@far.test>"]]
    # The relay's own Received: line is not shown, as Postfix does; one space after the colon is
    # dropped, folding lines are joined by LF.
    assert talk.headers() == [(b"From", b"a@example.test"), (b"To", b"x@far.test"),
                              (b"Subject", b"folded\n and continued"), (b"X-Empty", b"")]
    chunks = talk.data(b"B")
    assert all(len(c) <= 65535 for c in chunks) and b"".join(chunks) == body
    assert talk.macro(b"C", "j") == "relay.test" and talk.macro(b"C", "{daemon_name}") == "mailrelay"
    assert talk.macro(b"C", "{client_addr}") == "127.0.0.1" and talk.macro(b"C", "{client_port}") == str(client_port)
    assert talk.macro(b"M", "i") == message_id == talk.macro(b"E", "i")
    assert talk.macro(b"M", "{mail_addr}") == "a@example.test"
    assert [m["{rcpt_addr}"] for m in talk.macros[b"R"]] == ["x@far.test", "y@far.test"]
    assert talk.macro(b"M", "{auth_authen}") is None
    assert spooled.endswith(content)  # accepted unchanged


def test_an_authenticated_client_is_named_in_the_auth_macros(relay_process, milter, tmp_path):
    server = milter()
    secrets = tmp_path / "auth.secrets"
    secrets.write_text("server plain alice s3cret\n")
    relay = relay_process("--filter", server.spec, "--server-auth", str(secrets))
    with smtplib.SMTP("127.0.0.1", relay.port) as client:
        client.login("alice", "s3cret")
        client.sendmail("alice@example.test", ["x@far.test"], HAM)
    assert server.last.macro(b"M", "{auth_authen}") == "alice"
    assert server.last.macro(b"M", "{auth_type}") == "CRAM-MD5"  # smtplib picks the strongest offered


@pytest.mark.parametrize("proxy, family, address", [
    (b"PROXY TCP4 192.0.2.7 127.0.0.1 40001 25\r\n", b"4", b"192.0.2.7"),
    (b"PROXY TCP6 2001:db8::7 ::1 40001 25\r\n", b"6", b"2001:db8::7"),
], ids=["ipv4", "ipv6"])
def test_behind_a_proxy_the_milter_sees_the_real_client(relay_process, milter, tmp_path, proxy, family, address):
    server = milter()
    conf = tmp_path / "relay.conf"
    conf.write_text("[server]\nproxy_protocol = true\n")
    relay = relay_process("-c", str(conf), "--remote-clients", "--filter", server.spec)
    with Wire(relay.port) as wire:
        wire.send(proxy)
        assert wire.greet()[0] == 250
        for line in ("MAIL FROM:<a@example.test>", "RCPT TO:<x@relay.test>", "DATA"):  # a local domain
            assert wire.cmd(line)[0] in (250, 354)
        assert wire.cmd(HAM + b".")[0] == 250
    name, rest = server.last.data(b"C")[0].split(b"\0", 1)
    assert name == b"[" + address + b"]"
    assert rest[:1] == family and struct.unpack("!H", rest[1:3])[0] == 40001 and rest[3:] == address + b"\0"
    assert server.last.macro(b"C", "{client_addr}") == address.decode()


def test_steps_the_milter_declines_are_not_sent_and_skip_ends_the_body(relay_process, milter):
    # No HELO, no replies to headers, only the MAIL macros it names (SMFIR_SETSYMLIST, stage 2).
    server = milter(protocol=NO_HELO | NR_HDR | 0x400, symlists=struct.pack("!I", 2) + b"{mail_addr}\0")
    server.replies[b"B"] = (b"s", b"")  # enough body seen
    relay = relay_process("--filter", server.spec)
    body = (b"x" * 98 + b"\r\n") * 1400  # 140 KB: three chunks
    assert submit(relay.port, HAM + body) == (250, "")
    talk = server.last
    assert talk.commands() == b"CMRTLLLLNBEQ"
    assert talk.macros[b"M"] == [{"{mail_addr}": "a@example.test"}]
    assert len(spooled_contents(relay.spool)) == 1


# ---------------------------------------------------------------- edits
def test_header_edits_follow_sendmail_index_rules(relay_process, milter):
    server = milter()
    server.eom = [
        change_header(2, b"X-Tag", b"TWO"),          # the second X-Tag
        change_header(1, b"x-tag", b""),             # then delete the first (names are case-blind)
        change_header(1, b"Received", b"changed"),   # the first Received the milter saw: not ours
        change_header(3, b"X-Missing", b"added"),    # nothing to change: appended
        change_header(1, b"X-Absent", b""),          # nothing to delete: nothing happens
        insert_header(0, b"X-Top", b"top"),          # index 0: the very top, above our Received
        insert_header(99, b"X-Far", b"far"),         # past the end: appended
        add_header(b"X-Folded", b"one\ntwo\n\nthree"),  # continuation lines get white space
    ]
    relay = relay_process("--filter", server.spec)
    content = (b"Received: from upstream.test by mx.example.test; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
               b"From: a@example.test\r\nX-Tag: one\r\nSubject: tags\r\nX-Tag: two\r\nX-Tag: three\r\n"
               b"\r\nbody\r\n")
    assert submit(relay.port, content) == (250, "")
    _, spooled, _ = only_message(relay)
    head, _, body = spooled.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"X-Top: top"
    assert lines[1].startswith(b"Received: from [127.0.0.1]") and b"by relay.test" in lines[1]
    assert lines[3:] == [b"Received: changed", b"From: a@example.test", b"Subject: tags", b"X-Tag: TWO",
                         b"X-Tag: three", b"X-Missing: added", b"X-Far: far", b"X-Folded: one", b"\ttwo",
                         b"\tthree"]
    assert body == b"body\r\n"


def test_a_milter_that_keeps_the_leading_space_gets_values_as_they_are(relay_process, milter):
    server = milter(protocol=HDR_LEADSPC)
    server.eom = [add_header(b"X-Lead", b" spaced"), add_header(b"X-Tight", b"tight")]
    relay = relay_process("--filter", server.spec)
    assert submit(relay.port, HAM) == (250, "")
    assert (b"Subject", b" hello") in server.last.headers()
    _, spooled, _ = only_message(relay)
    assert b"\r\nX-Lead: spaced\r\nX-Tight:tight\r\n\r\n" in spooled


def test_body_replacement_in_chunks_is_written_with_crlf(relay_process, milter):
    server = milter()
    server.eom = [(b"b", b"new first line\nsecond "), (b"b", b"line\r\nlast line"), add_header(b"X-Replaced", b"yes")]
    relay = relay_process("--filter", server.spec)
    assert submit(relay.port, HAM) == (250, "")
    _, spooled, _ = only_message(relay)
    assert spooled.endswith(b"Message-ID: <m1@example.test>\r\nX-Replaced: yes\r\n\r\n"
                            b"new first line\r\nsecond line\r\nlast line\r\n")


def envelope_edits() -> list[tuple[bytes, bytes]]:
    return [(b"e", z(b"<bounces@example.test>", b"")),
            (b"+", z(b"<added@far.test>")),
            (b"2", z(b"<second@far.test>", b"NOTIFY=NEVER")),
            (b"-", z(b"<X@far.test>")),            # addresses compare without regard to case
            add_header(b"X-Rerouted", b"yes")]


def test_envelope_edits_at_the_server_stage_are_spooled_and_forwarded(relay_process, milter, target):
    server = milter()
    server.eom = envelope_edits()
    relay = relay_process("--filter", server.spec, "--forward-to", f"127.0.0.1:{target.port}", wait=True)
    assert submit(relay.port, HAM, recipients=("x@far.test", "y@far.test")) == (250, "")
    [got] = target.wait_for(1)
    assert got.sender == "bounces@example.test"
    assert sorted(got.recipients) == ["added@far.test", "second@far.test", "y@far.test"]
    assert b"X-Rerouted: yes\r\n" in got.content
    wait_until(lambda: not Spool(relay.spool).ids(), what="an empty spool")


def test_envelope_edits_at_the_client_stage_rewrite_the_queued_envelope(relay_process, milter, target):
    server = milter()
    server.eom = envelope_edits()
    relay = relay_process("--client-filter", server.spec, "--forward-to", f"127.0.0.1:{target.port}")
    assert submit(relay.port, HAM, recipients=("x@far.test", "y@far.test")) == (250, "")
    [got] = target.wait_for(1)
    assert (got.sender, sorted(got.recipients)) == (
        "bounces@example.test", ["added@far.test", "second@far.test", "y@far.test"])
    assert b"X-Rerouted: yes\r\n" in got.content
    wait_until(lambda: not Spool(relay.spool).ids(), what="an empty spool")
    assert "relock" not in relay.log and "Traceback" not in relay.log


# ---------------------------------------------------------------- decisions
DECISIONS = [
    ((b"r", b""), (550, "5.7.1 Command rejected")),
    (reply_code(b"554 5.7.1 Spam detected"), (554, "5.7.1 Spam detected")),
    (reply_code(b"550-5.7.1 first line\r\n550 5.7.1 second line"), (550, "5.7.1 first line second line")),
    (reply_code(b"550 100%% spam"), (550, "5.7.1 100% spam")),
    (reply_code(b"452 4.3.1 Busy, later"), (452, "4.3.1 Busy, later")),
    ((b"t", b""), (451, "4.7.1 Service unavailable - try again later")),
]


def test_the_milters_decision_is_the_reply_and_nothing_is_kept(relay_process, milter):
    server = milter()
    server.eom = [add_header(b"X-Ignored", b"edits do not survive a refusal")]
    relay = relay_process("--filter", server.spec)
    for final, reply in DECISIONS:
        server.final = final
        assert submit(relay.port, HAM) == reply, final
    assert spooled_contents(relay.spool) == []
    assert all(talk.commands().endswith(b"EQ") for talk in server.conversations)


def test_a_refused_recipient_refuses_the_message(relay_process, milter):
    server = milter()
    server.replies[b"R"] = reply_code(b"550 5.1.1 No such user here")
    relay = relay_process("--filter", server.spec)
    assert submit(relay.port, HAM) == (550, "5.1.1 No such user here")
    assert server.last.commands() == b"CHMRAQ"  # aborted, then goodbye
    assert spooled_contents(relay.spool) == []


def test_discard_acknowledges_and_drops(relay_process, milter, target):
    server = milter()
    server.final = (b"d", b"")
    relay = relay_process("--filter", server.spec, "--forward-to", f"127.0.0.1:{target.port}")
    assert submit(relay.port, HAM) == (250, "")
    assert spooled_contents(relay.spool) == [] and target.received == []


def test_discard_at_the_client_stage_removes_the_message(relay_process, milter, target):
    server = milter()
    server.final = (b"d", b"")
    relay = relay_process("--client-filter", server.spec, "--forward-to", f"127.0.0.1:{target.port}")
    assert submit(relay.port, HAM) == (250, "")
    wait_until(lambda: server.conversations and not list(Path(relay.spool).glob("*.content")),
               what="the discarded message to go")
    assert target.received == [] and not list(Path(relay.spool).glob("*.envelope*"))


@pytest.mark.parametrize("stage", ["--filter", "--client-filter"])
def test_quarantine_holds_the_message_as_bad_with_the_reason(relay_process, milter, target, stage):
    server = milter()
    server.eom = [(b"q", z(b"held for review")), add_header(b"X-Held", b"yes")]
    relay = relay_process(stage, server.spec, "--forward-to", f"127.0.0.1:{target.port}")
    assert submit(relay.port, HAM) == (250, "")
    spool = Spool(relay.spool)
    [message_id] = wait_until(lambda: spool.ids("bad"), what="a quarantined message")
    envelope = spool.read_envelope(message_id, "bad")
    assert envelope.reason == f"quarantined: milter 127.0.0.1:{server.port}: held for review"
    assert b"X-Held: yes\r\n" in spool.read_content(message_id)
    assert spool.ids() == [] and target.received == []


# ---------------------------------------------------------------- a milter in trouble
def test_a_milter_that_hangs_up_mid_message_is_a_temporary_failure(relay_process, milter):
    server = milter()
    server.close_at = b"L"
    relay = relay_process("--filter", server.spec)
    assert submit(relay.port, HAM) == TEMPFAIL
    assert spooled_contents(relay.spool) == []
    wait_until(lambda: "the milter closed the connection" in relay.log, what="the logged cause")
    server.close_at = None
    assert submit(relay.port, HAM) == (250, "")  # the client's retry
    assert len(spooled_contents(relay.spool)) == 1


def test_a_milter_that_does_not_answer_times_out_with_451(relay_process, milter):
    server = milter()
    server.hang_at = b"E"
    relay = relay_process("--filter", server.spec, "--filter-timeout", "1")
    started = time.monotonic()
    assert submit(relay.port, HAM) == TEMPFAIL
    assert time.monotonic() - started < 5
    assert spooled_contents(relay.spool) == []
    wait_until(lambda: "no answer within 1s" in relay.log, what="the logged timeout")


def test_at_the_client_stage_a_hanging_milter_keeps_the_message_for_later(relay_process, milter, target, tmp_path):
    server = milter()
    server.hang_at = b"E"
    conf = tmp_path / "relay.conf"
    conf.write_text('[queue]\nretry = ["1s"]\n')
    relay = relay_process("-c", str(conf), "--client-filter", server.spec, "--filter-timeout", "1",
                          "--forward-to", f"127.0.0.1:{target.port}", "--poll", "1")
    assert submit(relay.port, HAM) == (250, "")
    wait_until(lambda: "no answer within 1s" in relay.log, what="a failed client-stage attempt")
    assert target.received == [] and len(spooled_contents(relay.spool)) == 1
    server.hang_at = None
    [got] = target.wait_for(1)
    assert got.content.endswith(HAM)
    wait_until(lambda: spooled_contents(relay.spool) == [], what="an empty spool")


def test_a_milter_that_is_down_is_451_unless_configured_to_accept(relay_process, tmp_path):
    port = free_port()  # nothing listens here
    relay = relay_process("--filter", f"milter:127.0.0.1:{port}")
    assert submit(relay.port, HAM) == TEMPFAIL
    conf = tmp_path / "relay.conf"
    conf.write_text('[milter]\non_error = "accept"\n')
    lenient = relay_process("-c", str(conf), "--filter", f"milter:inet:{port}@127.0.0.1")
    assert submit(lenient.port, HAM) == (250, "")
    wait_until(lambda: "passing the message unfiltered" in lenient.log, what="the logged warning")


def test_a_milter_that_breaks_the_protocol_is_a_temporary_failure(relay_process, milter):
    server = milter(actions=0x01 | 0x04)  # may add headers and recipients, nothing else
    relay = relay_process("--filter", server.spec)
    cases = [
        ([(b"-", z(b"<x@far.test>"))], (b"a", b""), {}, "did not negotiate"),
        ([(b"+", z(b"<>"))], (b"a", b""), {}, "bad address"),
        ([], reply_code(b"250 2.0.0 fine"), {}, "malformed reply code"),
        ([], (b"a", b""), {b"R": add_header(b"X-Early", b"too early")}, "before the end of the message"),
    ]
    for eom, final, replies, logged in cases:
        server.eom, server.final, server.replies = eom, final, replies
        assert submit(relay.port, HAM) == TEMPFAIL, logged
        wait_until(lambda: logged in relay.log, what=f"the logged cause {logged!r}")
    assert spooled_contents(relay.spool) == []
    assert all(talk.commands().endswith(b"Q") for talk in server.conversations)  # always a goodbye


# ---------------------------------------------------------------- addresses
def test_unix_socket_milter(relay_process, milter, tmp_path):
    server = milter(unix_path=tmp_path / "milter.sock")
    server.final = reply_code(b"550 5.7.0 Not from here")
    relay = relay_process("--filter", server.spec)
    assert submit(relay.port, HAM) == (550, "5.7.0 Not from here")


@pytest.mark.parametrize("spec", ["milter:", "milter:unix:relative/path", "milter:localhost",
                                  "milter:127.0.0.1:99999"])
def test_a_bad_milter_address_stops_start_up(relay_process, spec):
    relay = relay_process("--filter", spec, wait=False)
    assert relay.proc.wait(20) != 0
    assert repr(spec) in relay.log


# ---------------------------------------------------------------- parsers
@given(st.binary(max_size=300))
def test_any_reply_code_text_is_refused_or_gives_one_safe_line(data):
    try:
        code, enhanced, text = parse_reply(data)
    except MilterError:
        return
    assert 400 <= code <= 599 and enhanced[0] == str(code)[0]
    assert "\r" not in text and "\n" not in text


@given(st.lists(st.sampled_from([b"From: a\r\n", b"X-A: b\r\n", b" folded\r\n", b"\r\n", b"body\r\n",
                                 b"no colon\r\n", b"\tx\r\n", b"Received: id q1 ;\r\n"]), max_size=12))
def test_splitting_a_message_into_header_fields_and_the_rest_loses_nothing(parts):
    content = b"".join(parts)
    assert Content(content, "q1").to_bytes() == content
