"""copy: and deliver: through a real relay: mailboxes on disk, what stays in the spool, what is forwarded."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import submit, wait_until
from mailrelay.spool import Envelope
from mailrelay_plugins.filters.mailbox import mailbox_problem
from mailrelay_sdk import Recipient, Verdict, hookimpl

BODY = b"Subject: for the mailbox\r\n\r\nhello mailbox\r\n"


def marker(tmp_path: Path, mailboxes: dict[str, str]) -> str:
    """A program filter that plays address verifier: it rewrites ``To-Remote: addr`` as
    ``To-Local: mailbox`` for the addresses in ``mailboxes``."""
    script = tmp_path / "mark_local.py"
    script.write_text(f"""#!{sys.executable}
import sys
mailboxes = {json.dumps(mailboxes)}
path = sys.argv[2]
lines = open(path, "rb").read().decode().split("\\r\\n")
out = []
for line in lines:
    name, _, value = line.partition(": ")
    if name == "X-MailRelay-To-Remote" and value in mailboxes:
        line = "X-MailRelay-To-Local: " + mailboxes[value]
    out.append(line)
open(path, "wb").write("\\r\\n".join(out).encode())
""")
    script.chmod(0o755)
    return str(script)


def send(port: int, recipients: list[str], body: bytes = BODY) -> tuple[int, str]:
    """One transaction; the reply to the end of DATA."""
    return submit(port, body, sender="sender@example.test", recipients=recipients)


def spool_messages(spool: Path) -> dict[str, Envelope]:
    """Ready messages at the top of the spool: id -> envelope."""
    return {p.name[:-len(".envelope")]: Envelope.from_bytes(p.read_bytes()) for p in spool.glob("*.envelope")}


def maildir_messages(mailbox: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted((mailbox / "new").iterdir())]


# ---------------------------------------------------------------- deliver:
def test_deliver_puts_a_local_only_message_into_a_new_maildir_and_removes_it_from_the_spool(tmp_path, relay_process):
    mark = marker(tmp_path, {"bob@local.test": "bob", "carol@local.test": "carol"})
    relay = relay_process("--filter", f"{mark},deliver:")
    code, _ = send(relay.port, ["bob@local.test", "carol@local.test"])
    assert code == 250
    for name in ("bob", "carol"):
        mailbox = relay.spool / name
        assert sorted(p.name for p in mailbox.iterdir()) == ["cur", "new", "tmp"]
        [delivered] = maildir_messages(mailbox)
        assert delivered.endswith(BODY) and b"Received: " in delivered
        assert list((mailbox / "tmp").iterdir()) == []  # nothing left half-written
    assert not list(relay.spool.glob("*.content")) and not list(relay.spool.glob("*.envelope*"))


def test_deliver_keeps_a_mixed_message_with_only_its_remote_recipients(tmp_path, relay_process):
    mark = marker(tmp_path, {"bob@local.test": "bob"})
    relay = relay_process("--filter", f"{mark},deliver:")
    assert send(relay.port, ["bob@local.test", "far@remote.test", "near@remote.test"])[0] == 250
    assert len(maildir_messages(relay.spool / "bob")) == 1
    [(message_id, envelope)] = spool_messages(relay.spool).items()
    assert [r.address for r in envelope.recipients] == ["far@remote.test", "near@remote.test"]
    assert not envelope.local_recipients
    assert b"X-MailRelay-ToCount: 2\r\n" in (relay.spool / f"{message_id}.envelope").read_bytes()


def test_deliver_uses_the_delivery_dir_and_respects_existing_mailboxes(tmp_path, relay_process):
    boxes = tmp_path / "mailboxes"
    for sub in ("tmp", "new", "cur"):
        (boxes / "maildir" / sub).mkdir(parents=True)
    (boxes / "plain").mkdir()  # an E-MailRelay --pop-by-name mailbox
    mark = marker(tmp_path, {"m@local.test": "maildir", "p@local.test": "plain"})
    relay = relay_process("--filter", f"{mark},deliver:", "--delivery-dir", str(boxes))
    assert send(relay.port, ["m@local.test", "p@local.test"])[0] == 250
    assert maildir_messages(boxes / "maildir")[0].endswith(BODY)
    [content] = list((boxes / "plain").glob("*.content"))
    envelope = Envelope.from_bytes((boxes / "plain" / (content.name[:-len(".content")] + ".envelope")).read_bytes())
    assert content.read_bytes().endswith(BODY)
    assert sorted(r.mailbox for r in envelope.recipients) == ["maildir", "plain"]
    assert not (relay.spool / "maildir").exists()


def test_deliver_hardlink_and_nodelete(tmp_path, relay_process):
    mark = marker(tmp_path, {"bob@local.test": "bob"})
    relay = relay_process("--filter", f"{mark},deliver:hardlink;nodelete")
    assert send(relay.port, ["bob@local.test"])[0] == 250
    [kept] = list(relay.spool.glob("*.content"))  # nodelete: the message stays
    [delivered] = list((relay.spool / "bob" / "new").iterdir())
    assert os.stat(kept).st_ino == os.stat(delivered).st_ino


@pytest.mark.parametrize("mailbox", ["../escape", ".hidden", "a/b", "bad\tname"])
def test_deliver_refuses_a_mailbox_name_that_could_leave_the_delivery_dir(tmp_path, relay_process, mailbox):
    boxes = tmp_path / "boxes" / "inner"
    mark = marker(tmp_path, {"evil@local.test": mailbox})
    relay = relay_process("--filter", f"{mark},deliver:", "--delivery-dir", str(boxes))
    code, reply = send(relay.port, ["evil@local.test"])
    assert code == 451, reply
    assert sorted(p.name for p in boxes.parent.rglob("*")) == ["inner"]  # nothing created anywhere
    assert not list(relay.spool.glob("*.envelope*"))
    wait_until(lambda: "refusing mailbox" in relay.log, what="a log line naming the bad mailbox")
    assert repr(mailbox) in relay.log


class Verifier:
    """An address verifier plugin: recipients at local.test are local, mailbox = the local part."""

    @hookimpl
    def on_rcpt_to(self, session, transaction, recipient):
        if recipient.domain == "local.test":
            return Verdict.ok(recipient=Recipient.local(recipient.address, recipient.address.split("@")[0]))
        return None


def test_deliver_uses_mailboxes_marked_by_an_address_verifier(inprocess_relay):
    relay = inprocess_relay(plugins={"verifier": Verifier()}, enable=["filters"],
                            config={"filters": {"server": ["deliver:"]}})
    assert send(relay.port, ["alice@local.test", "x@remote.test"])[0] == 250
    spool = Path(relay.spool.directory)
    assert maildir_messages(spool / "alice")[0].endswith(BODY)
    [(_, envelope)] = spool_messages(spool).items()
    assert [r.address for r in envelope.recipients] == ["x@remote.test"]


def test_deliver_as_a_client_filter_forwards_only_the_remote_recipients(tmp_path, relay_process, sink):
    target = sink()
    mark = marker(tmp_path, {"bob@local.test": "bob"})
    relay = relay_process("--filter", mark, "--client-filter", "deliver:", "--forward-to",
                          f"127.0.0.1:{target.port}", "--poll", "1")
    assert send(relay.port, ["bob@local.test", "far@remote.test"])[0] == 250
    [received] = target.wait_for(1)
    assert received.recipients == ["far@remote.test"]
    assert maildir_messages(relay.spool / "bob")[0].endswith(BODY)
    wait_until(lambda: not list(relay.spool.glob("*.content")), what="the forwarded message to leave the spool")


@given(st.text(min_size=0, max_size=40))
def test_an_accepted_mailbox_name_is_one_visible_directory_inside_the_delivery_dir(name):
    base = Path("/srv/mail")
    if mailbox_problem(name) is None:
        path = Path(os.path.normpath(base / name))
        assert path.parent == base and path.name == name and not name.startswith(".")
        assert name.isprintable()


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "x/..", "a/b", "a\\b", "a\x00b", ".dot", "x..y", "tab\t",
                                  "x" * 256])
def test_unsafe_mailbox_names_are_refused(name):
    assert mailbox_problem(name) is not None


@pytest.mark.parametrize("name", ["bob", "postmaster", "user.name", "Ünïcode", "a-b_c+d"])
def test_ordinary_mailbox_names_are_accepted(name):
    assert mailbox_problem(name) is None


# ---------------------------------------------------------------- copy:
def _layout(spool: Path) -> None:
    for name in ("alice", "bob", "postmaster", ".hidden"):
        (spool / name).mkdir(parents=True)
    for sub in ("tmp", "new", "cur"):
        (spool / "maildir" / sub).mkdir(parents=True)


def test_copy_fills_every_mailbox_but_postmaster_and_dot_dirs_then_drops_the_original(tmp_path, relay_process):
    spool = tmp_path / "spool"
    _layout(spool)
    relay = relay_process("--filter", "copy:", spool=spool)
    assert send(relay.port, ["someone@example.test"])[0] == 250
    for name in ("alice", "bob"):
        [content] = list((spool / name).glob("*.content"))
        assert content.read_bytes().endswith(BODY)
        envelope = Envelope.from_bytes(content.with_suffix(".envelope").read_bytes())
        assert [r.address for r in envelope.recipients] == ["someone@example.test"]
    assert maildir_messages(spool / "maildir")[0].endswith(BODY)
    assert list((spool / "postmaster").iterdir()) == [] and list((spool / ".hidden").iterdir()) == []
    assert not list(spool.glob("*.content")) and not list(spool.glob("*.envelope*"))  # abandoned: not forwarded
    assert "not [.hidden,postmaster]" in relay.log


def test_copy_nodelete_keeps_the_original_and_hardlink_shares_the_content(tmp_path, relay_process):
    spool = tmp_path / "spool"
    (spool / "alice").mkdir(parents=True)
    relay = relay_process("--filter", "copy:nodelete;hardlink", spool=spool)
    assert send(relay.port, ["someone@example.test"])[0] == 250
    [original] = list(spool.glob("*.content"))
    assert (spool / original.name.replace(".content", ".envelope")).exists()
    copy = spool / "alice" / original.name
    assert os.stat(copy).st_ino == os.stat(original).st_ino
    assert stat.S_ISREG(os.stat(copy.with_suffix(".envelope")).st_mode)


def test_copy_pop_leaves_the_content_in_the_spool_for_pop_by_name(tmp_path, relay_process, sink):
    target = sink()
    spool = tmp_path / "spool"
    _layout(spool)
    relay = relay_process("--client-filter", "copy:pop", "--forward-to", f"127.0.0.1:{target.port}",
                          "--poll", "1", spool=spool)
    assert send(relay.port, ["someone@example.test"])[0] == 250
    [envelope] = wait_until(lambda: list((spool / "alice").glob("*.envelope")), what="the envelope copy")
    # The original's envelope goes once every copy is made.
    wait_until(lambda: not list(spool.glob("*.envelope*")), what="the spool envelope to go")
    message_id = envelope.name[:-len(".envelope")]
    assert (spool / "bob" / envelope.name).exists() and not list((spool / "alice").glob("*.content"))
    assert (spool / f"{message_id}.content").read_bytes().endswith(BODY)  # shared, in the spool
    assert maildir_messages(spool / "maildir")[0].endswith(BODY)
    assert target.received == []  # abandoned: never forwarded


def test_copy_pop_is_refused_as_a_server_filter(relay_process):
    relay = relay_process("--filter", "copy:pop", wait=False)
    assert relay.proc.wait(20) != 0
    assert "copy:pop" in relay.log and "--client-filter" in relay.log


def test_copy_pop_is_refused_with_a_delivery_dir_outside_the_spool(relay_process, tmp_path):
    relay = relay_process("--client-filter", "copy:pop", "--delivery-dir", str(tmp_path / "mailboxes"),
                          "--forward-to", "127.0.0.1:9", wait=False)
    assert relay.proc.wait(20) != 0
    assert "copy:pop" in relay.log and "spool sub-directories" in relay.log


def test_unknown_option_words_stop_start_up(relay_process):
    relay = relay_process("--filter", "deliver:nodelet", wait=False)
    assert relay.proc.wait(20) != 0
    assert "unknown option 'nodelet'" in relay.log


def test_copy_pop_content_survives_a_restart(tmp_path, relay_process, sink):
    target = sink()
    spool = tmp_path / "spool"
    (spool / "alice").mkdir(parents=True)
    relay = relay_process("--client-filter", "copy:pop", "--forward-to", f"127.0.0.1:{target.port}",
                          "--poll", "1", spool=spool)
    assert send(relay.port, ["someone@example.test"])[0] == 250
    [envelope] = wait_until(lambda: list((spool / "alice").glob("*.envelope")), what="the envelope copy")
    wait_until(lambda: not list(spool.glob("*.envelope*")), what="the spool envelope to go")
    relay.stop()
    content = spool / envelope.name.replace(".envelope", ".content")
    os.utime(content, (os.stat(content).st_atime, os.stat(content).st_mtime - 3600))
    relay_process(spool=spool)  # a restart, an hour later
    assert content.exists(), "the POP user's message was deleted by the restart"


def test_deliver_as_a_client_filter_delivers_a_local_only_message(tmp_path, relay_process, sink):
    target = sink()
    mark = marker(tmp_path, {"bob@local.test": "bob"})
    relay = relay_process("--filter", mark, "--client-filter", "deliver:", "--forward-to",
                          f"127.0.0.1:{target.port}", "--poll", "1")
    assert send(relay.port, ["bob@local.test"])[0] == 250
    wait_until(lambda: list((relay.spool / "bob" / "new").glob("*")) or not list(relay.spool.glob("*.content")),
               what="the message to be delivered or dropped")
    assert maildir_messages(relay.spool / "bob")[0].endswith(BODY)
