"""Which mailbox a POP3 user gets and what QUIT does to it: ``--pop-by-name`` maildirs, E-MailRelay's
layout (the spool itself without ``--pop-by-name``, ``copy:`` directories, ``copy:pop`` with the
content left in the spool), ``--pop-no-delete``, and user names that must not become paths."""

from __future__ import annotations

from conftest import submit
from mailrelay.queue.claim import claim
from test_pop3_protocol import MESSAGES, pop3  # noqa: F401  (pop3: the fixture)

MESSAGE = b"From: a@example.test\r\nSubject: spooled\r\n\r\n.dot\r\nbody\r\n"


def test_without_pop_by_name_the_spool_itself_is_served_and_emptied_at_quit(pop3):
    relay = pop3(by_name=False)
    spool = relay.root
    for _ in range(2):
        assert submit(relay.running.port, MESSAGE)[0] == 250
    ids = sorted(p.name[: -len(".envelope")] for p in spool.glob("*.envelope"))
    client = relay.connect()
    assert client.login().startswith("+OK 2 messages")
    status, uids = client.multi("UIDL")
    assert sorted(line.split()[1] for line in uids.decode().split("\r\n") if line) == ids
    status, body = client.multi("RETR 1")
    assert body.endswith(b"Subject: spooled\r\n\r\n..dot\r\nbody\r\n")  # with our Received: on top
    assert int(status.split()[1]) == (spool / f"{ids[0]}.content").stat().st_size
    client.cmd("DELE 1")
    assert client.cmd("QUIT") == "+OK Bye (1 messages deleted)"
    assert sorted(p.name for p in spool.iterdir() if not p.name.startswith(".")) == \
        [f"{ids[1]}.content", f"{ids[1]}.envelope"]


def test_a_spooled_message_being_forwarded_is_not_deleted_under_the_forwarder(pop3):
    relay = pop3(by_name=False)
    spool = relay.root
    assert submit(relay.running.port, MESSAGE)[0] == 250
    [message_id] = [p.name[: -len(".envelope")] for p in spool.glob("*.envelope")]
    client = relay.connect()
    client.login()
    client.cmd("DELE 1")
    forwarding = claim(spool, message_id)  # the queue runner takes it while the session is open
    assert forwarding is not None
    try:
        assert client.cmd("QUIT").startswith("-ERR [SYS/TEMP] 1 deleted message(s) not removed")
        assert (spool / f"{message_id}.envelope.busy").exists() and (spool / f"{message_id}.content").exists()
    finally:
        forwarding.release()


def test_pop_no_delete_answers_dele_but_keeps_every_message(pop3):
    relay = pop3(no_delete=True)
    relay.deliver(MESSAGES[0])
    client = relay.connect()
    assert "EXPIRE NEVER" in client.multi("CAPA")[1].decode()
    client.login()
    client.multi("RETR 1")
    assert client.cmd("DELE 1") == "+OK Message 1 deleted"
    assert client.cmd("RETR 1") == "-ERR Message 1 is deleted"  # as far as this session goes
    assert client.cmd("QUIT") == "+OK Bye (0 messages deleted)"
    [kept] = relay.files()
    assert kept.startswith("cur/") and kept.endswith(":2,S")  # read, and still there
    assert relay.connect().login().startswith("+OK 1 messages")


def test_each_user_sees_only_the_mailbox_named_after_them(pop3):
    relay = pop3()
    relay.deliver(b"Subject: for alice\r\n\r\nA\r\n", user="alice")
    relay.deliver(b"Subject: for bob\r\n\r\nB\r\n", user="bob")
    relay.deliver(b"Subject: for bob too\r\n\r\nB2\r\n", user="bob")
    alice, bob = relay.connect(), relay.connect()
    assert alice.login("alice", "alice-pw").startswith("+OK 1 messages")
    assert bob.login("bob", "bob-pw").startswith("+OK 2 messages")
    assert b"for alice" in alice.multi("RETR 1")[1]
    assert b"for bob" in bob.multi("RETR 1")[1] and b"for bob too" in bob.multi("RETR 2")[1]


def test_a_new_user_gets_an_empty_maildir(pop3):
    relay = pop3()
    client = relay.connect()
    assert client.login("bob", "bob-pw") == "+OK 0 messages (0 octets)"
    assert client.cmd("STAT") == "+OK 0 0"
    assert sorted(p.name for p in relay.maildir("bob").iterdir()) == [".pop3.lock", "cur", "new", "tmp"]


def test_user_names_never_become_paths_out_of_the_mailbox_directory(pop3, tmp_path):
    # xtext: +2E is ".", +2F is "/"
    relay = pop3(secrets="server plain +2E+2E+2Fescape pw\nserver plain +2Ehidden pw\nserver plain a+2Fb pw\n")
    for user in ("../escape", ".hidden", "a/b"):
        client = relay.connect()
        assert client.login(user, "pw") == "-ERR [SYS/TEMP] Mailbox unavailable, try again later"
        assert client.cmd("STAT").startswith("-ERR")
    assert not (tmp_path / "escape").exists() and not (relay.root / ".hidden").exists()
    assert not (relay.root / "a").exists()


def test_a_copy_directory_in_emailrelay_layout_is_a_mailbox(pop3):
    relay = pop3()
    box = relay.maildir("alice")
    box.mkdir(parents=True)
    (box / "emailrelay.1.2.3.content").write_bytes(MESSAGE)
    (box / "emailrelay.1.2.3.envelope").write_bytes(b"X-MailRelay-Format: #2821.5\r\n")
    (box / "emailrelay.1.2.4.envelope.busy").write_bytes(b"")  # not ready: not listed
    client = relay.connect()
    assert client.login().startswith(f"+OK 1 messages ({len(MESSAGE)} octets)")
    assert client.cmd("UIDL 1") == "+OK 1 emailrelay.1.2.3"
    assert client.multi("RETR 1")[1] == b"From: a@example.test\r\nSubject: spooled\r\n\r\n..dot\r\nbody\r\n"
    client.cmd("DELE 1")
    assert client.cmd("QUIT").startswith("+OK Bye (1 messages")
    assert sorted(p.name for p in box.iterdir()) == [".pop3.lock", "emailrelay.1.2.4.envelope.busy"]


def test_copy_pop_content_in_the_spool_goes_with_its_last_envelope(pop3):
    relay = pop3(directory="")  # mailboxes are sub-directories of the spool, as with copy:pop
    spool = relay.running.spool.directory
    relay.root = spool
    (spool / "emailrelay.9.9.9.content").write_bytes(MESSAGE)
    for user in ("alice", "bob"):
        (spool / user).mkdir()
        (spool / user / "emailrelay.9.9.9.envelope").write_bytes(b"X-MailRelay-Format: #2821.5\r\n")
    for user, content_stays in (("alice", True), ("bob", False)):
        client = relay.connect()
        assert client.login(user, f"{user}-pw").startswith("+OK 1 messages")
        assert client.multi("RETR 1")[1].endswith(b"..dot\r\nbody\r\n")
        client.cmd("DELE 1")
        assert client.cmd("QUIT").startswith("+OK Bye (1 messages")
        assert not (spool / user / "emailrelay.9.9.9.envelope").exists()
        assert (spool / "emailrelay.9.9.9.content").exists() == content_stays
