"""E-MailRelay compatibility: the relay reads E-MailRelay 2.6.1's spool files as written, and the
files it writes itself look the same, field for field and byte for byte.

The reference files live in ``../shared/emailrelay-spool`` (see its README for how each was made).
"""

from __future__ import annotations

import re
import shutil
import smtplib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailrelay.spool import Envelope, Spool, commit_marker, xtext_decode, xtext_encode
from mailrelay_sdk import Recipient, Verdict, hookimpl

EMAILRELAY = Path(__file__).resolve().parents[2] / "shared" / "emailrelay-spool"
READY = EMAILRELAY / "ready"
BAD = EMAILRELAY / "bad"

SWAKS_PLAIN = "emailrelay.11970.1795612325.1"
UTF8_SENDER = "emailrelay.11970.1795612325.2"
NULL_SENDER = "emailrelay.11970.1795612325.3"
MIXED = "emailrelay.12048.1795612333.1"
READY_IDS = [SWAKS_PLAIN, UTF8_SENDER, NULL_SENDER, MIXED]

ENVELOPE_FILES = sorted([*READY.glob("*.envelope"), *BAD.glob("*.envelope.bad")])
_RECEIVED = re.compile(rb"\AReceived:[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*")


def remote(address: str) -> Recipient:
    return Recipient(address)


def local(mailbox: str) -> Recipient:
    # E-MailRelay's To-Local line holds the mailbox name only, so that is what reads back.
    return Recipient(mailbox, mailbox=mailbox)


EXPECTED: dict[str, dict[str, object]] = {
    SWAKS_PLAIN: dict(sender="bob@remote.test", recipients=(remote("someone@far.test"),),
                      content="unknown", utf8_mailbox_names=False),
    UTF8_SENDER: dict(sender="jürgen@xn--exmple-cua.test", recipients=(remote("müller@far.test"),),
                      content="8bit", utf8_mailbox_names=True),
    NULL_SENDER: dict(sender="", recipients=(local("postmaster"),), content="unknown",
                      utf8_mailbox_names=False),
    MIXED: dict(sender="bob@remote.test",
                recipients=(local("alice"), remote("x@far.test"), remote("y@other.test")),
                content="8bit", utf8_mailbox_names=False),
}


def body_after_received(content: bytes) -> bytes:
    """The content without its leading Received: header (folded or not)."""
    match = _RECEIVED.match(content)
    assert match, f"content does not start with a Received: header: {content[:80]!r}"
    return content[match.end():]


def envelope_lines(data: bytes) -> list[bytes]:
    assert data.endswith(b"\r\n")
    lines = data[:-2].split(b"\r\n")
    assert not any(b"\n" in line or b"\r" in line for line in lines), "a line ends without CRLF"
    return lines


def field_name(line: bytes) -> bytes:
    return line.partition(b":")[0]


@pytest.fixture
def emailrelay_spool(tmp_path: Path) -> Spool:
    """A spool directory holding copies of E-MailRelay's ready/ files."""
    directory = tmp_path / "spool"
    shutil.copytree(READY, directory)
    return Spool(directory)


# ---------------------------------------------------------------- reading E-MailRelay's files
def test_the_reference_spool_is_present():
    assert len(ENVELOPE_FILES) == 5
    assert sorted(p.name.removesuffix(".envelope") for p in READY.glob("*.envelope")) == READY_IDS


@pytest.mark.parametrize("message_id", READY_IDS)
def test_emailrelay_envelope_parses_with_the_right_fields(message_id: str):
    envelope = Envelope.from_bytes((READY / f"{message_id}.envelope").read_bytes())
    for name, value in EXPECTED[message_id].items():
        assert getattr(envelope, name) == value, name
    assert envelope.format == "#2821.8"
    assert envelope.authentication == "carol"
    assert envelope.client == "127.0.0.1"
    assert envelope.client_certificate == envelope.mail_from_auth_in == envelope.mail_from_auth_out == ""
    assert envelope.forward_to == envelope.forward_to_address == envelope.client_account_selector == ""
    assert envelope.reason == envelope.reason_code == ""
    assert envelope.extra == ()


def test_local_and_remote_recipients_are_told_apart():
    envelope = Envelope.from_bytes((READY / f"{MIXED}.envelope").read_bytes())
    assert [r.mailbox for r in envelope.local_recipients] == ["alice"]
    assert [r.address for r in envelope.remote_recipients] == ["x@far.test", "y@other.test"]
    null = Envelope.from_bytes((READY / f"{NULL_SENDER}.envelope").read_bytes())
    assert null.remote_recipients == ()
    assert [r.mailbox for r in null.local_recipients] == ["postmaster"]


def test_bad_envelope_keeps_reason_and_reason_code():
    envelope = Envelope.from_bytes((BAD / f"{SWAKS_PLAIN}.envelope.bad").read_bytes())
    assert envelope.reason == "one or more recipients rejected"
    assert envelope.reason_code == "250"  # what E-MailRelay records, not the 550 it received
    assert envelope.sender == "bob@remote.test"
    assert envelope.recipients == (remote("someone@far.test"),)
    assert envelope.authentication == "carol"


@pytest.mark.parametrize("path", ENVELOPE_FILES, ids=lambda p: p.name)
def test_emailrelay_envelope_is_written_back_byte_for_byte(path: Path):
    original = path.read_bytes()
    assert Envelope.from_bytes(original, source=str(path)).to_bytes() == original


def test_spool_lists_emailrelay_messages_in_sorted_order(emailrelay_spool: Spool):
    assert emailrelay_spool.ids() == READY_IDS
    assert emailrelay_spool.ids("bad") == []
    assert emailrelay_spool.ids("new") == emailrelay_spool.ids("busy") == []
    assert [message_id for message_id, _ in emailrelay_spool.iter_ready()] == READY_IDS


@pytest.mark.parametrize("message_id", READY_IDS)
def test_spool_reads_emailrelay_envelope_and_content(emailrelay_spool: Spool, message_id: str):
    envelope = emailrelay_spool.read_envelope(message_id)
    assert envelope.sender == EXPECTED[message_id]["sender"]
    assert envelope.recipients == EXPECTED[message_id]["recipients"]
    assert emailrelay_spool.read_content(message_id) == (READY / f"{message_id}.content").read_bytes()


def test_spool_lists_a_failed_message_under_bad(tmp_path: Path):
    spool = Spool(tmp_path / "spool")
    shutil.copytree(BAD, spool.directory)
    assert spool.ids("bad") == [SWAKS_PLAIN]
    assert spool.ids() == []
    envelope = spool.read_envelope(SWAKS_PLAIN, "bad")
    assert (envelope.reason, envelope.reason_code) == ("one or more recipients rejected", "250")
    assert spool.read_content(SWAKS_PLAIN).startswith(b"Received: from vm ([127.0.0.1]) by relay.test")


def test_marking_a_message_bad_writes_what_emailrelay_writes():
    ready = Envelope.from_bytes((READY / f"{SWAKS_PLAIN}.envelope").read_bytes())
    bad = ready.with_reason("one or more recipients rejected", 250)
    assert bad.to_bytes() == (BAD / f"{SWAKS_PLAIN}.envelope.bad").read_bytes()


# ---------------------------------------------------------------- files the relay writes
class LocalMailboxes:
    """Like the README's verifier.sh: alice and postmaster at local.test are local mailboxes."""

    @hookimpl
    def on_rcpt_to(self, recipient: Recipient) -> Verdict | None:
        if recipient.address in ("alice@local.test", "postmaster@local.test"):
            return Verdict.ok(recipient=Recipient.local(recipient.address,
                                                        recipient.address.partition("@")[0]))
        return None


def send(relay, sender: str, recipients: list[str], content: bytes, options: list[str]) -> str:
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        client.ehlo("client.test")
        refused = client.sendmail(sender, recipients, content, mail_options=options)
        assert refused == {}
        reply = client.noop()
        assert reply[0] == 250
    ids = relay.spool.ids()
    assert len(ids) == 1
    return ids[0]


def as_emailrelay_wrote_it_without_auth(message_id: str) -> list[bytes]:
    # The reference messages were sent after AUTH as carol; ours are sent without AUTH.
    lines = envelope_lines((READY / f"{message_id}.envelope").read_bytes())
    return [b"X-MailRelay-Authentication: " if field_name(line) == b"X-MailRelay-Authentication"
            else line for line in lines]


# (reference message, MAIL FROM, RCPT TO list, MAIL parameters)
SENT_LIKE_EMAILRELAY = [
    pytest.param(SWAKS_PLAIN, "bob@remote.test", ["someone@far.test"], [], id="plain-unknown"),
    pytest.param(UTF8_SENDER, "jürgen@exämple.test", ["müller@far.test"], ["SMTPUTF8", "BODY=8BITMIME"],
                 id="smtputf8"),
    pytest.param(NULL_SENDER, "", ["postmaster@local.test"], [], id="null-sender-local"),
    pytest.param(MIXED, "bob@remote.test", ["alice@local.test", "x@far.test", "y@other.test"],
                 ["BODY=8BITMIME"], id="mixed-8bit"),
]


@pytest.mark.parametrize("reference, sender, recipients, options", SENT_LIKE_EMAILRELAY)
def test_relay_writes_envelopes_like_emailrelay(inprocess_relay, reference: str, sender: str,
                                                recipients: list[str], options: list[str]):
    relay = inprocess_relay(plugins={"local-mailboxes": LocalMailboxes()})
    theirs = (READY / f"{reference}.content").read_bytes()
    message_id = send(relay, sender, recipients, body_after_received(theirs), options)

    raw = relay.spool.envelope_path(message_id).read_bytes()
    # After the End line, where E-MailRelay stops reading (and which it keeps when it rewrites
    # an envelope), comes our commit marker; up to End the file is E-MailRelay's, byte for byte.
    assert commit_marker.read_marker(raw) is not None
    ours = envelope_lines(commit_marker.unmarked(raw))
    expected = as_emailrelay_wrote_it_without_auth(reference)
    assert [field_name(line) for line in ours] == [field_name(line) for line in expected]
    for mine, emailrelays in zip(ours, expected):
        if emailrelays.endswith(b": "):
            assert mine == emailrelays, "an empty field is written as 'Name: ' with a trailing space"
    assert ours == expected


@pytest.mark.parametrize("reference, sender, recipients, options", SENT_LIKE_EMAILRELAY)
def test_relay_writes_content_like_emailrelay(inprocess_relay, reference: str, sender: str,
                                              recipients: list[str], options: list[str]):
    relay = inprocess_relay(plugins={"local-mailboxes": LocalMailboxes()})
    theirs = (READY / f"{reference}.content").read_bytes()
    message_id = send(relay, sender, recipients, body_after_received(theirs), options)

    ours = relay.spool.read_content(message_id)
    assert ours.startswith(b"Received: from client.test ([127.0.0.1]) by relay.test ")
    assert message_id.encode() in ours.split(b"\r\n\r\n")[0]
    assert b"\n" not in ours.replace(b"\r\n", b""), "every content line ends in CRLF"
    assert body_after_received(ours) == body_after_received(theirs)


def test_a_body_line_starting_with_a_dot_is_stored_unstuffed(inprocess_relay):
    relay = inprocess_relay()
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        client.ehlo("client.test")
        client.mail("bob@remote.test")
        client.rcpt("x@far.test")
        client.putcmd("data")
        assert client.getreply()[0] == 354
        # Dot-stuffed by hand (RFC 5321 4.5.2), so the test does not rely on smtplib doing it.
        client.send(b"Subject: dots\r\n\r\nfirst\r\n..leading dot line\r\n...\r\n.\r\n")
        assert client.getreply()[0] == 250
    [message_id] = relay.spool.ids()
    content = relay.spool.read_content(message_id)
    assert body_after_received(content) == b"Subject: dots\r\n\r\nfirst\r\n.leading dot line\r\n..\r\n"


def test_smtputf8_sender_is_stored_with_an_idna_domain(inprocess_relay):
    relay = inprocess_relay()
    message_id = send(relay, "jürgen@exämple.test", ["müller@far.test"],
                      "Subject: utf8\r\n\r\nGrüße\r\n".encode(), ["SMTPUTF8", "BODY=8BITMIME"])
    envelope = relay.spool.read_envelope(message_id)
    assert envelope.sender == "jürgen@xn--exmple-cua.test"
    assert envelope.utf8_mailbox_names is True
    assert envelope.content == "8bit"
    raw = relay.spool.envelope_path(message_id).read_bytes()
    assert "X-MailRelay-From: jürgen@xn--exmple-cua.test\r\n".encode() in raw
    assert b"X-MailRelay-Utf8MailboxNames: 1\r\n" in raw
    assert b"X-MailRelay-Content: 8bit\r\n" in raw


# ---------------------------------------------------------------- properties
_LINE_TEXT = st.text(alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)))
_CRLF_TEXT = st.builds(lambda a, brk, b: a + brk + b, _LINE_TEXT, st.sampled_from(["\r", "\n", "\r\n"]),
                       _LINE_TEXT)
_RECIPIENT = st.one_of(st.builds(Recipient, _LINE_TEXT),
                       _LINE_TEXT.map(lambda mailbox: Recipient(mailbox, mailbox=mailbox)))


@settings(max_examples=300, deadline=None)
@given(sender=_LINE_TEXT, recipients=st.lists(_RECIPIENT, max_size=5),
       content=st.sampled_from(["7bit", "8bit", "unknown"]), authentication=_LINE_TEXT,
       client=_LINE_TEXT, auth_in=_LINE_TEXT, auth_out=_LINE_TEXT, forward_to=_LINE_TEXT,
       utf8=st.booleans(), reason=_LINE_TEXT, reason_code=_LINE_TEXT)
def test_envelope_round_trips(sender, recipients, content, authentication, client, auth_in, auth_out,
                              forward_to, utf8, reason, reason_code):
    envelope = Envelope(sender=sender, recipients=tuple(recipients), content=content,
                        authentication=authentication, client=client, mail_from_auth_in=auth_in,
                        mail_from_auth_out=auth_out, forward_to=forward_to, forward_to_address=forward_to,
                        client_account_selector=forward_to, utf8_mailbox_names=utf8,
                        reason=reason, reason_code=reason_code)
    data = envelope.to_bytes()
    parsed = Envelope.from_bytes(data)
    if not (reason or reason_code):
        assert (parsed.reason, parsed.reason_code) == ("", "")
    assert parsed == envelope
    assert parsed.to_bytes() == data
    expected_lines = 14 + len(recipients) + (2 if reason or reason_code else 0)
    assert data.count(b"\r\n") == expected_lines
    assert data.count(b"\n") == expected_lines


@settings(max_examples=300, deadline=None)
@given(text=st.text())
def test_xtext_round_trips(text: str):
    encoded = xtext_encode(text)
    assert encoded.isascii()
    assert all(0x21 <= ord(c) <= 0x7E and c != "=" for c in encoded)
    assert xtext_decode(encoded) == text


_RAW_FIELDS = ["sender", "client", "forward_to", "forward_to_address", "client_account_selector", "format",
               "reason", "reason_code", "recipient", "local_recipient", "extra_value"]
_XTEXT_FIELDS = ["authentication", "mail_from_auth_in", "mail_from_auth_out"]


def _envelope_with(where: str, value: str) -> Envelope:
    kwargs: dict[str, object] = {"sender": "a@b.test", "recipients": (Recipient("c@d.test"),)}
    if where == "recipient":
        kwargs["recipients"] = (Recipient(value),)
    elif where == "local_recipient":
        kwargs["recipients"] = (Recipient("c@d.test", mailbox=value),)
    elif where == "extra_value":
        kwargs["extra"] = (("Custom", value),)
    else:
        kwargs[where] = value
    return Envelope(**kwargs)  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(where=st.sampled_from(_RAW_FIELDS), value=_CRLF_TEXT)
def test_a_line_break_in_a_field_can_never_add_an_envelope_line(where: str, value: str):
    with pytest.raises(ValueError):
        _envelope_with(where, value).to_bytes()


@settings(max_examples=200, deadline=None)
@given(where=st.sampled_from(_XTEXT_FIELDS), value=_CRLF_TEXT)
def test_a_line_break_in_an_xtext_field_is_encoded_not_written(where: str, value: str):
    envelope = _envelope_with(where, value)
    data = envelope.to_bytes()
    assert data.count(b"\n") == data.count(b"\r\n") == 15
    assert b"+0D" in data or b"+0A" in data
    assert Envelope.from_bytes(data) == envelope


@settings(max_examples=200, deadline=None)
@given(value=_CRLF_TEXT)
def test_a_line_break_in_an_extra_field_name_can_never_add_an_envelope_line(value: str):
    envelope = Envelope(sender="a@b.test", recipients=(Recipient("c@d.test"),),
                        extra=((value, "v"),))
    with pytest.raises(ValueError):
        envelope.to_bytes()


@settings(max_examples=200, deadline=None)
@given(lines=st.lists(_LINE_TEXT, min_size=1, max_size=6))
def test_a_client_certificate_is_folded_never_forging_a_field(lines: list[str]):
    pem = "\n".join(["-----BEGIN CERTIFICATE-----", *lines, "X-MailRelay-End: 1",
                     "-----END CERTIFICATE-----"])
    envelope = Envelope(sender="a@b.test", recipients=(Recipient("c@d.test"),), client_certificate=pem)
    data = envelope.to_bytes()
    parsed = Envelope.from_bytes(data)
    assert parsed.extra == ()
    assert parsed.sender == "a@b.test" and parsed.recipients == (Recipient("c@d.test"),)
    assert [field_name(line) for line in data.split(b"\r\n") if line.startswith(b"X-MailRelay-")] == \
        [field_name(line) for line in Envelope(sender="x", recipients=(Recipient("y"),)).to_bytes()
         .split(b"\r\n") if line]
