"""The POP3 server as a client sees it (RFC 1939, 2449, 5034): every command in every state, the
UPDATE state, locking, sizes, UIDs, logins and their throttling. The relay runs in-process with
the ``pop3`` plugin; the client is a byte-exact socket client or Python's poplib."""

from __future__ import annotations

import base64
import hashlib
import poplib
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from conftest import wait_until
from mailrelay_sdk import hookimpl
from mailrelay_plugins.pop3.server import Pop3Server

MESSAGES = [
    b"Subject: one\r\n\r\nfirst message\r\n",
    b"Subject: two\r\n\r\n.a line with a dot\r\n..two dots\r\n.\r\nend\r\n",
    b"Subject: three\n\nbare line feeds\n.dot\nno final line end",
]


# ---------------------------------------------------------------- a byte-exact client
class Pop:
    """POP3 over a socket: exact lines in, exact octets out."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0, sock: Any = None):
        self.sock = sock or socket.create_connection((host, port), timeout)
        self.buf = b""
        self.greeting = self.line()

    def line(self) -> str:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed; partial line {self.buf!r}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line.decode("utf-8", "replace")

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def cmd(self, text: str) -> str:
        self.send(text + "\r\n")
        return self.line()

    def body(self) -> bytes:
        """The rest of a multi-line response, as sent (still byte-stuffed), without the final dot."""
        while b"\r\n.\r\n" not in b"\r\n" + self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed in a multi-line response")
            self.buf += chunk
        data = b"\r\n" + self.buf
        end = data.index(b"\r\n.\r\n")
        self.buf = data[end + 5:]
        return data[2:end + 2]

    def multi(self, text: str) -> tuple[str, bytes]:
        status = self.cmd(text)
        return status, self.body() if status.startswith("+OK") else b""

    def login(self, user: str = "alice", password: str = "alice-pw") -> str:
        assert self.cmd(f"USER {user}").startswith("+OK")
        return self.cmd(f"PASS {password}")

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except OSError:
            return True

    def close(self) -> None:
        self.sock.close()


def unstuff(data: bytes) -> bytes:
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in data.split(b"\r\n"))


# ---------------------------------------------------------------- a relay with POP3
SECRETS = "server plain alice alice-pw\nserver plain bob bob-pw\n"
PLAINTEXT = "-ERR [AUTH] Plaintext login refused on this connection: use STLS first"


@dataclass
class PopRelay:
    running: Any
    root: Path        # the mailbox directory (by_name) or the spool
    port: int
    tls_port: int

    @property
    def server(self) -> Pop3Server:
        return next(listener for listener in self.running.relay.listeners if isinstance(listener, Pop3Server))

    def connect(self, **kwargs: Any) -> Pop:
        return Pop(self.port, **kwargs)

    def maildir(self, user: str = "alice") -> Path:
        return self.root / user

    def deliver(self, content: bytes, user: str = "alice", name: str | None = None) -> Path:
        """A message as deliver: leaves it: written to tmp/, renamed into new/."""
        box = self.maildir(user)
        for sub in ("tmp", "new", "cur"):
            (box / sub).mkdir(parents=True, exist_ok=True)
        name = name or f"{time.time_ns()}.M{len(list((box / 'new').iterdir()))}P1.test"
        (box / "tmp" / name).write_bytes(content)
        (box / "tmp" / name).rename(box / "new" / name)
        return box / "new" / name

    def files(self, user: str = "alice") -> list[str]:
        box = self.maildir(user)
        return sorted(f"{sub}/{p.name}" for sub in ("new", "cur") for p in (box / sub).iterdir())


@pytest.fixture
def pop3(inprocess_relay, tmp_path) -> Callable[..., PopRelay]:
    """Factory: an in-process relay with the pop3 plugin; ``by_name`` mailboxes under tmp_path/mail."""
    def start(secrets: str = SECRETS, tls: dict | None = None, plugins: dict | None = None,
              **settings: Any) -> PopRelay:
        secrets_file = tmp_path / f"pop{len(list(tmp_path.glob('pop*.secrets')))}.secrets"
        secrets_file.write_text(secrets)
        root = tmp_path / "mail"
        pop3 = {"port": 0, "auth": str(secrets_file), "by_name": True, "directory": str(root),
                "failure_delay": 0, **settings}
        config: dict[str, Any] = {"pop3": pop3}
        if tls:
            config["tls"] = tls
        running = inprocess_relay(plugins=plugins, enable=["pop3"], config=config)
        relay = PopRelay(running, root if pop3["by_name"] else Path(running.spool.directory), 0, 0)
        server = relay.server
        relay.port = server.port
        relay.tls_port = next((s.getsockname()[1] for s, implicit in server.sockets if implicit), 0)
        return relay
    return start


@pytest.fixture
def mailbox(pop3) -> PopRelay:
    """alice's maildir with the three MESSAGES."""
    relay = pop3()
    for i, content in enumerate(MESSAGES):
        relay.deliver(content, name=f"100000000{i}.M{i}P1.test")
    return relay


# ---------------------------------------------------------------- every command in every state
# command: (reply in AUTHORIZATION, reply in TRANSACTION), as the start of the status line
STATE_TABLE = {
    "CAPA": ("+OK", "+OK"),
    "USER alice": ("+OK", "-ERR"),
    "PASS alice-pw": ("-ERR USER first", "-ERR"),
    "APOP alice 0123456789abcdef0123456789abcdef": ("-ERR [AUTH]", "-ERR"),
    "AUTH": ("+OK", "-ERR"),
    "STLS": ("-ERR STLS not available", "-ERR"),
    "STAT": ("-ERR", "+OK 3 "),
    "LIST": ("-ERR", "+OK 3 messages"),
    "LIST 2": ("-ERR", "+OK 2 "),
    "UIDL": ("-ERR", "+OK 3 messages"),
    "UIDL 1": ("-ERR", "+OK 1 1000000000.M0P1.test"),
    "RETR 1": ("-ERR", "+OK "),
    "TOP 1 0": ("-ERR", "+OK"),
    "DELE 1": ("-ERR", "+OK Message 1 deleted"),
    "NOOP": ("-ERR", "+OK"),
    "RSET": ("-ERR", "+OK 3 messages"),
    "QUIT": ("+OK", "+OK"),
    "XTND XMIT": ("-ERR Unknown command", "-ERR Unknown command"),
    "LAST": ("-ERR Unknown command", "-ERR Unknown command"),
}
MULTILINE = {"CAPA", "LIST", "UIDL", "RETR 1", "TOP 1 0", "AUTH"}


@pytest.mark.parametrize("command", list(STATE_TABLE))
def test_every_command_in_every_state(mailbox, command):
    for state, expected in zip(("AUTHORIZATION", "TRANSACTION"), STATE_TABLE[command]):
        client = mailbox.connect()
        if state == "TRANSACTION":
            assert client.login().startswith("+OK 3 messages")
        reply = client.cmd(command)
        assert reply.startswith(expected), (state, command, reply)
        if reply.startswith("-ERR") and expected == "-ERR":
            assert "not valid in the" in reply and state in reply
        if reply.startswith("+OK") and command in MULTILINE:
            client.body()
        if command != "QUIT":
            if state == "TRANSACTION":
                assert client.cmd("RSET").startswith("+OK")
            assert client.cmd("QUIT").startswith("+OK")
        assert client.closed()
    assert len(mailbox.files()) == 3  # RSET before every QUIT: nothing was removed


def test_retr_of_a_deleted_message_fails_rset_restores_and_quit_commits(mailbox):
    client = mailbox.connect()
    client.login()
    assert client.cmd("DELE 2") == "+OK Message 2 deleted"
    assert client.cmd("RETR 2") == "-ERR Message 2 is deleted"
    assert client.cmd("DELE 2") == "-ERR Message 2 is deleted"
    assert client.cmd("LIST 2") == "-ERR Message 2 is deleted"
    status, listing = client.multi("LIST")
    assert status.startswith("+OK 2 messages") and b"2 " not in listing.split(b"\r\n")[1]
    assert client.cmd("STAT").startswith("+OK 2 ")
    assert client.cmd("RSET").startswith("+OK 3 messages")
    assert client.cmd("RETR 2").startswith("+OK")
    client.body()
    assert client.cmd("DELE 1") == "+OK Message 1 deleted"
    assert client.cmd("DELE 3") == "+OK Message 3 deleted"
    assert len(mailbox.files()) == 3  # nothing before QUIT
    assert client.cmd("QUIT") == "+OK Bye (2 messages deleted)"
    # Message 2 stays, now read: in cur/ with the S flag.
    assert mailbox.files() == ["cur/1000000001.M1P1.test:2,S"]
    assert mailbox.connect().login() == f"+OK 1 messages ({len(MESSAGES[1])} octets)"


def test_a_dropped_connection_deletes_nothing(mailbox):
    client = mailbox.connect()
    client.login()
    for n in (1, 2, 3):
        assert client.cmd(f"DELE {n}").startswith("+OK")
    client.close()  # no QUIT
    again = mailbox.connect()
    assert wait_until(lambda: not (reply := again.login()).startswith("-ERR [IN-USE]") and reply,
                      what="the lock to be released").startswith("+OK 3 messages")
    assert len(mailbox.files()) == 3


def test_list_counts_exactly_what_retr_sends_before_stuffing(mailbox):
    client = mailbox.connect()
    client.login()
    status, listing = client.multi("LIST")
    sizes = [int(line.split()[1]) for line in listing.decode().split("\r\n") if line]
    total = 0
    for number, size in enumerate(sizes, 1):
        status, sent = client.multi(f"RETR {number}")
        assert status == f"+OK {size} octets"
        assert len(unstuff(sent)) == size
        total += size
    assert client.cmd("STAT") == f"+OK 3 {total}"
    # The dot lines went out stuffed; the bare line feeds as CRLF; a last line got its end.
    assert client.multi("RETR 2")[1] == b"Subject: two\r\n\r\n..a line with a dot\r\n...two dots\r\n..\r\nend\r\n"
    assert client.multi("RETR 3")[1] == b"Subject: three\r\n\r\nbare line feeds\r\n..dot\r\nno final line end\r\n"
    assert client.multi("TOP 2 1")[1] == b"Subject: two\r\n\r\n..a line with a dot\r\n"
    client.cmd("QUIT")


def test_poplib_retrieves_what_was_stored(mailbox):
    client = poplib.POP3("127.0.0.1", mailbox.port, timeout=10)
    client.user("alice")
    client.pass_("alice-pw")
    assert client.stat()[0] == 3
    assert b"\r\n".join(client.retr(1)[1]) + b"\r\n" == MESSAGES[0]
    assert b"\r\n".join(client.retr(2)[1]) + b"\r\n" == MESSAGES[1]  # poplib un-stuffs
    client.quit()


def test_uidl_is_stable_across_sessions_and_after_retrieval(mailbox):
    def uids() -> list[bytes]:
        client = poplib.POP3("127.0.0.1", mailbox.port, timeout=10)
        client.user("alice")
        client.pass_("alice-pw")
        found = client.uidl()[1]
        client.retr(2)
        client.quit()
        return found

    first = uids()
    assert first == [b"1 1000000000.M0P1.test", b"2 1000000001.M1P1.test", b"3 1000000002.M2P1.test"]
    assert "cur/1000000001.M1P1.test:2,S" in mailbox.files()  # moved: its name changed ...
    assert uids() == first                                     # ... its UID did not


def test_a_second_session_is_told_the_mailbox_is_in_use(mailbox):
    first = mailbox.connect()
    assert first.login().startswith("+OK")
    second = mailbox.connect()
    assert second.login() == "-ERR [IN-USE] Mailbox in use by another session, try again later"
    assert second.cmd("STAT").startswith("-ERR")        # still in AUTHORIZATION
    other = mailbox.connect()
    assert other.login("bob", "bob-pw").startswith("+OK 0 messages")  # another mailbox is free
    assert first.cmd("DELE 1").startswith("+OK")
    assert first.cmd("QUIT").startswith("+OK Bye (1 messages")
    assert second.login().startswith("+OK 2 messages")   # the lock went with the QUIT


def test_mail_arriving_during_a_session_appears_in_the_next(mailbox):
    client = mailbox.connect()
    assert client.login().startswith("+OK 3 messages")
    mailbox.deliver(b"Subject: late\r\n\r\nlate\r\n")
    assert client.cmd("STAT").startswith("+OK 3 ")
    assert client.multi("LIST")[1].count(b"\r\n") == 3
    for n in (1, 2, 3):
        client.cmd(f"DELE {n}")
    assert client.cmd("QUIT") == "+OK Bye (3 messages deleted)"
    client = mailbox.connect()
    assert client.login().startswith("+OK 1 messages")
    assert b"late" in client.multi("RETR 1")[1]


def test_pipelined_commands_are_answered_in_order(mailbox):
    client = mailbox.connect()
    assert "PIPELINING" in client.multi("CAPA")[1].decode()
    client.send("USER alice\r\nPASS alice-pw\r\nSTAT\r\nLIST 1\r\nRETR 1\r\nNOOP\r\nQUIT\r\n")
    assert client.line() == "+OK Send PASS"
    assert client.line().startswith("+OK 3 messages")
    assert client.line().startswith("+OK 3 ")
    assert client.line().startswith("+OK 1 ")
    assert client.line().startswith("+OK") and client.body() == MESSAGES[0]
    assert client.line() == "+OK"
    assert client.line().startswith("+OK Bye")


def test_capa_lists_the_rfc_2449_capabilities(mailbox):
    client = mailbox.connect()
    status, capabilities = client.multi("CAPA")
    assert status == "+OK Capability list follows"
    assert capabilities.decode().split("\r\n")[:-1] == [
        "TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING", "USER", "SASL PLAIN",
        "IMPLEMENTATION mailrelay"]
    client.login()
    assert "USER" not in client.multi("CAPA")[1].decode()  # nothing to log in to any more


# ---------------------------------------------------------------- logins
def test_auth_plain_with_an_initial_response_a_continuation_and_a_cancel(mailbox):
    token = base64.b64encode(b"\0alice\0alice-pw").decode()
    client = mailbox.connect()
    assert client.cmd(f"AUTH PLAIN {token}").startswith("+OK 3 messages")
    client.cmd("QUIT")
    client = mailbox.connect()
    assert client.cmd("AUTH PLAIN") == "+ "
    assert client.cmd("*") == "-ERR Authentication cancelled"
    assert client.cmd("AUTH PLAIN") == "+ "
    assert client.cmd("not base64!") == "-ERR Malformed PLAIN response"
    assert client.cmd("AUTH CRAM-MD5") == "-ERR Unsupported authentication mechanism"
    assert client.cmd("AUTH PLAIN") == "+ "
    assert client.cmd(token).startswith("+OK 3 messages")
    client.cmd("QUIT")


def test_apop_with_a_plain_password(mailbox):
    client = mailbox.connect()
    timestamp = re.search(r"<[^>]+>", client.greeting).group(0)
    digest = hashlib.md5((timestamp + "alice-pw").encode()).hexdigest()
    wrong = hashlib.md5((timestamp + "guess").encode()).hexdigest()
    assert client.cmd(f"APOP alice {wrong}") == "-ERR [AUTH] Authentication failed"
    assert client.cmd(f"APOP alice {digest}").startswith("+OK 3 messages")
    client.cmd("QUIT")
    assert poplib.POP3("127.0.0.1", mailbox.port).apop("bob", "bob-pw").startswith(b"+OK 0 messages")


def test_apop_is_not_offered_without_plain_passwords(pop3):
    import bcrypt
    hashed = bcrypt.hashpw(b"carol-pw", bcrypt.gensalt(4)).decode()
    relay = pop3(secrets=f"server bcrypt carol {hashed}\n")
    client = relay.connect()
    assert "<" not in client.greeting
    assert client.cmd("APOP carol 0123456789abcdef0123456789abcdef") == "-ERR APOP not available"
    assert client.login("carol", "carol-pw").startswith("+OK 0 messages")


def test_a_failed_login_does_not_say_whether_the_user_exists(pop3):
    relay = pop3(failure_delay=0.3)
    answers = {}
    for user in ("alice", "nobody-here"):
        client = relay.connect()
        started = time.monotonic()
        plain = base64.b64encode(b"\0" + user.encode() + b"\0wrong").decode()
        answers[user] = (client.login(user, "wrong"), client.cmd(f"AUTH PLAIN {plain}"))
        assert time.monotonic() - started >= 0.6  # two failures, each at least failure_delay
    assert answers["alice"] == answers["nobody-here"] == ("-ERR [AUTH] Authentication failed",) * 2


def test_repeated_failures_are_throttled_then_refused(pop3):
    relay = pop3(throttle_delay_after=2, throttle_delay=0.2, throttle_disconnect_after=4)
    client = relay.connect()
    started = time.monotonic()
    for _ in range(4):
        assert client.login("alice", "guess") == "-ERR [AUTH] Authentication failed"
    assert time.monotonic() - started >= 0.2 + 0.4  # the third and fourth attempts waited
    assert client.login("alice", "alice-pw") == "-ERR [SYS/TEMP] Too many failed logins, try again later"
    assert client.closed()
    # The right password from another address would do; from this one, not until the window ends.
    assert relay.connect().login("alice", "alice-pw").startswith("-ERR [SYS/TEMP]")


# ---------------------------------------------------------------- robustness
def test_an_interrupted_expunge_is_finished_before_the_next_listing(mailbox):
    (mailbox.maildir() / ".pop3-expunge").write_text('{"delete": ["new/1000000000.M0P1.test"]}')
    client = mailbox.connect()
    assert client.login().startswith("+OK 2 messages")
    assert not (mailbox.maildir() / ".pop3-expunge").exists()
    client.cmd("QUIT")


def test_the_idle_timer_closes_the_session_without_committing(pop3):
    relay = pop3(idle_timeout=1)
    relay.deliver(MESSAGES[0])
    client = relay.connect()
    client.login()
    client.cmd("DELE 1")
    assert client.line() == "-ERR Idle timeout, closing the connection"
    assert client.closed()
    assert len(relay.files()) == 1


def test_overlong_lines_nul_and_a_stream_of_garbage_end_the_session(mailbox):
    client = mailbox.connect()
    assert client.cmd("USER " + "x" * 10000) == "-ERR Line too long"
    assert client.closed()
    client = mailbox.connect()
    assert client.cmd("USER alice\0../../etc") == "-ERR NUL in command"
    assert client.closed()
    client = mailbox.connect()
    replies = [client.cmd("HELO") for _ in range(20)]
    assert replies[-1] == "-ERR Unknown command" and client.line() == "-ERR Too many errors, closing the connection"
    assert client.closed()


def test_shutdown_says_goodbye_and_commits_nothing(mailbox):
    client = mailbox.connect()
    client.login()
    client.cmd("DELE 1")
    mailbox.running.stop()
    assert client.line() == "-ERR [SYS/TEMP] Server shutting down"
    assert client.closed()
    assert len(mailbox.files()) == 3
    assert not (mailbox.maildir() / ".pop3-expunge").exists()



class Observer:
    def __init__(self) -> None:
        self.events: list[Any] = []

    @hookimpl
    def on_event(self, event: Any) -> None:
        self.events.append(event)


def test_logins_and_updates_are_events_for_observers(pop3):
    observer = Observer()
    relay = pop3(plugins={"observer": observer})
    relay.deliver(MESSAGES[0])
    client = relay.connect()
    client.login("alice", "wrong")
    client.login()
    client.multi("RETR 1")
    client.cmd("DELE 1")
    client.cmd("QUIT")
    wait_until(lambda: any(e.name == "pop3.update" for e in observer.events), what="the update event")
    seen = {e.name: dict(e.data) for e in observer.events if e.name.startswith(("auth.", "pop3."))}
    assert seen["auth.failed"]["protocol"] == "pop3" and seen["auth.failed"]["user"] == "alice"
    assert seen["auth.succeeded"]["mechanism"] == "USER"
    assert seen["pop3.login"]["messages"] == 1
    assert seen["pop3.update"]["deleted"] == 1 and seen["pop3.update"]["retrieved"] == 1
