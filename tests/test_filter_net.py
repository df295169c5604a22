"""``net:``: a filter that is a network server speaking E-MailRelay's line protocol.

The server here is a real one on a loopback port (or a unix socket): it reads the content file
named on each request line and answers ``ok`` or an error line, as a filter daemon written for
E-MailRelay would.
"""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import free_port, spooled_contents, submit, wait_until
from mailrelay_plugins.filters.net import result_from_reply
from mailrelay_sdk import FilterAction
from sinks import Sink

HAM = (b"From: a@example.test\r\nTo: x@far.test\r\nSubject: hello\r\nMessage-ID: <net1@example.test>\r\n"
       b"\r\nplain text\r\n")


def mail(subject: str, body: str = "plain text") -> bytes:
    return HAM.replace(b"hello", subject.encode()).replace(b"plain text", body.encode())


class LineFilterServer:
    """A filter daemon: one request line (a content path) in, one answer line out, per message.

    ``answer(content)`` gives the reply line. ``drop`` closes the connection instead of answering
    ("next": the next request only, "always": every request); ``close_after_answer`` hangs up after
    each answer, as a server with a short idle limit would.
    """

    def __init__(self, answer: Callable[[bytes], str] = lambda content: "ok", *, unix_path: Path | None = None,
                 port: int | None = None):
        self.answer = answer
        self.unix_path = unix_path
        self.port = 0 if unix_path else port or free_port()
        self.connections = 0
        self.requests: list[tuple[str, bytes]] = []
        self.drop = ""
        self.close_after_answer = False
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._server: socketserver.BaseServer | None = None

    @property
    def spec(self) -> str:
        return f"net:{self.unix_path}" if self.unix_path else f"net:127.0.0.1:{self.port}"

    def start(self) -> "LineFilterServer":
        owner = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                with owner._lock:
                    owner.connections += 1
                    owner._open.append(self.connection)
                for line in self.rfile:
                    path = line.decode().rstrip("\n")
                    content = Path(path).read_bytes()
                    with owner._lock:
                        owner.requests.append((path, content))
                        drop = owner.drop
                        if drop == "next":
                            owner.drop = ""
                    if drop:
                        return
                    self.wfile.write(owner.answer(content).encode() + b"\n")
                    self.wfile.flush()
                    if owner.close_after_answer:
                        return

        if self.unix_path:
            self.unix_path.unlink(missing_ok=True)
            server: socketserver.BaseServer = socketserver.ThreadingUnixStreamServer(str(self.unix_path), Handler)
        else:
            socketserver.ThreadingTCPServer.allow_reuse_address = True
            server = socketserver.ThreadingTCPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True  # type: ignore[attr-defined]
        self._server = server
        threading.Thread(target=server.serve_forever, name="net-filter", daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop listening and hang up on every open connection (a server that went down)."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._server = None
        with self._lock:
            for conn in self._open:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._open.clear()


@pytest.fixture
def filter_server():
    servers: list[LineFilterServer] = []

    def start(answer: Callable[[bytes], str] = lambda content: "ok", **kw) -> LineFilterServer:
        server = LineFilterServer(answer, **kw).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def send(relay, content: bytes = HAM) -> tuple[int, str]:
    return submit(relay.port, content)


def spooled(relay) -> list[bytes]:
    return spooled_contents(relay.spool)


def rejecting(content: bytes) -> str:
    return "550 no thanks\tmatched rule 7" if b"Subject: bad" in content else "ok"


# ---------------------------------------------------------------- verdicts
def test_accepted_message_is_spooled_after_the_server_saw_its_content_file(relay_process, filter_server):
    server = filter_server()
    relay = relay_process("--filter", server.spec)
    assert send(relay) == (250, "")
    [(path, content)] = server.requests
    assert path.startswith(str(relay.spool)) and path.endswith(".content")
    assert content.endswith(HAM)
    assert spooled(relay) == [content]


@pytest.mark.parametrize("answer, code, text", [
    ("550 no thanks\tmatched rule 7", 550, "5.7.1 no thanks"),
    ("452 mailbox busy, later\tscanner overloaded", 452, "4.7.1 mailbox busy, later"),
    ("go away", 550, "5.7.1 go away"),       # no code: [filters] reject_code
    ("554", 554, "5.7.1 rejected"),
], ids=["5xx", "4xx", "no-code", "code-only"])
def test_error_line_becomes_the_smtp_reply_and_the_tab_part_only_the_log(relay_process, filter_server,
                                                                         answer, code, text):
    server = filter_server(lambda content: answer)
    relay = relay_process("--filter", server.spec)
    assert send(relay) == (code, text)
    assert spooled(relay) == []
    if "\t" in answer:
        logged = answer.split("\t")[1]
        assert logged not in text
        wait_until(lambda: logged in relay.log, what="the logged reason")


def test_one_connection_serves_many_messages(relay_process, filter_server):
    server = filter_server(rejecting)
    relay = relay_process("--filter", server.spec)
    replies = [send(relay, mail(subject)) for subject in ("one", "bad", "three", "four")]
    assert [code for code, _ in replies] == [250, 550, 250, 250]
    assert len(server.requests) == 4
    assert server.connections == 1
    assert len(spooled(relay)) == 3


@pytest.mark.parametrize("connections", [1, 4])
def test_concurrent_sessions_each_get_their_own_verdict(relay_process, filter_server, tmp_path, connections):
    def slow(content: bytes) -> str:
        time.sleep(0.2)  # long enough for the sessions to overlap
        return rejecting(content)

    server = filter_server(slow)
    conf = tmp_path / "relay.conf"
    conf.write_text(f"[net]\nconnections = {connections}\n")
    relay = relay_process("-c", str(conf), "--filter", server.spec)
    subjects = ["bad" if i % 2 else f"good{i}" for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(lambda s: send(relay, mail(s)), subjects))
    assert [code for code, _ in replies] == [550 if s == "bad" else 250 for s in subjects]
    assert len(server.requests) == 6
    if connections == 1:
        assert server.connections == 1  # the requests took turns
    else:
        assert 1 < server.connections <= connections
    assert sorted(c.split(b"Subject: ")[1][:5] for c in spooled(relay)) == [b"good0", b"good2", b"good4"]


# ---------------------------------------------------------------- connection trouble
def test_server_hanging_up_between_messages_is_transparent(relay_process, filter_server):
    server = filter_server()
    server.close_after_answer = True
    relay = relay_process("--filter", server.spec)
    assert [send(relay, mail(s))[0] for s in ("one", "two", "three")] == [250, 250, 250]
    assert server.connections == 3
    assert len(spooled(relay)) == 3


def test_request_dropped_on_a_kept_connection_is_sent_once_more(relay_process, filter_server):
    server = filter_server(rejecting)
    relay = relay_process("--filter", server.spec)
    assert send(relay, mail("one"))[0] == 250
    server.drop = "next"  # the kept connection dies under the next request, unanswered
    assert send(relay, mail("bad")) == (550, "5.7.1 no thanks")
    assert server.connections == 2
    assert [c.count(b"Subject: bad") for _, c in server.requests] == [0, 1, 1]


def test_server_that_keeps_dropping_requests_is_a_temporary_failure(relay_process, filter_server):
    server = filter_server()
    relay = relay_process("--filter", server.spec)
    assert send(relay, mail("one"))[0] == 250
    server.drop = "always"
    code, text = send(relay, mail("two"))
    assert (code, text) == (451, "4.3.0 Temporary local problem, please try again later")
    assert len(server.requests) == 3  # the first message, then one request and exactly one retry
    assert len(spooled(relay)) == 1
    wait_until(lambda: "connection lost before the answer" in relay.log, what="the logged cause")


def test_server_down_is_451_and_the_message_goes_through_once_it_is_back(relay_process, filter_server):
    server = filter_server()
    relay = relay_process("--filter", server.spec)
    assert send(relay, mail("one"))[0] == 250
    server.stop()
    assert send(relay, mail("two")) == (451, "4.3.0 Temporary local problem, please try again later")
    assert len(spooled(relay)) == 1
    wait_until(lambda: "server unavailable" in relay.log, what="the logged cause")
    again = filter_server(port=server.port)
    assert send(relay, mail("two"))[0] == 250  # the client's retry
    assert [b"Subject: two" in c for c in spooled(relay)].count(True) == 1
    assert len(again.requests) == 1


def test_server_never_listening_is_a_temporary_failure(relay_process):
    port = free_port()  # nothing listens here
    relay = relay_process("--filter", f"net:127.0.0.1:{port}")
    assert send(relay) == (451, "4.3.0 Temporary local problem, please try again later")
    assert spooled(relay) == []


def test_server_that_never_answers_is_a_temporary_failure_within_the_filter_timeout(relay_process):
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        relay = relay_process("--filter", f"net:127.0.0.1:{silent.getsockname()[1]}", "--filter-timeout", "1")
        assert send(relay) == (451, "4.3.0 Temporary local problem, please try again later")
    assert spooled(relay) == []
    wait_until(lambda: "no answer within 1s" in relay.log, what="the logged timeout")


# ---------------------------------------------------------------- address forms and stages
def test_unix_socket_server(relay_process, filter_server, tmp_path):
    server = filter_server(rejecting, unix_path=tmp_path / "filter.s")
    relay = relay_process("--filter", server.spec)
    assert send(relay, mail("good"))[0] == 250
    assert send(relay, mail("bad")) == (550, "5.7.1 no thanks")
    assert server.connections == 1
    assert len(spooled(relay)) == 1


@pytest.mark.parametrize("spec", ["net:", "net:localhost", "net:127.0.0.1:99999", "net:::1:25"])
def test_bad_address_stops_start_up(relay_process, spec):
    relay = relay_process("--filter", spec, wait=False)
    assert relay.proc.wait(20) != 0
    assert repr(spec) in relay.log


def test_client_stage_failure_keeps_the_message_until_the_server_is_back(relay_process, filter_server, tmp_path):
    server = filter_server(lambda content: "ok")
    server.stop()  # down when the message is first forwarded
    target = Sink(free_port()).start()
    try:
        conf = tmp_path / "relay.conf"
        conf.write_text('[queue]\nretry = ["1s"]\n')
        relay = relay_process("-c", str(conf), "--forward-to", f"127.0.0.1:{target.port}",
                              "--client-filter", server.spec, "--poll", "1")
        assert send(relay) == (250, "")
        wait_until(lambda: "server unavailable" in relay.log, what="a failed client-stage attempt")
        assert target.received == [] and len(spooled(relay)) == 1
        again = filter_server(port=server.port)
        [got] = target.wait_for(1)
        assert got.content.endswith(HAM)
        assert len(again.requests) == 1
        wait_until(lambda: spooled(relay) == [], what="an empty spool")
    finally:
        target.stop()


# ---------------------------------------------------------------- the reply parser
@given(st.text(max_size=200))
def test_any_reply_line_gives_a_safe_single_line_verdict(line):
    result = result_from_reply(line)
    if not line or line.startswith("ok"):
        assert result.action is FilterAction.OK
        return
    assert result.action in (FilterAction.REJECT, FilterAction.FAIL)
    assert 400 <= result.code <= 599 and (result.action is FilterAction.FAIL) == (result.code < 500)
    # Nothing a server sends can break the reply line: no control characters, no tab, no CR/LF.
    assert result.text and all(ch >= " " and not "\x7f" <= ch <= "\x9f" for ch in result.text)
