"""Bounces: when mail cannot be delivered the sender gets an RFC 3464 report that any mail
program can read: what failed and why, and the headers of the message (never its body).

Each report is parsed back the way a receiving program would (Python's email parser), and its
delivery-status part is also read field by field from the raw bytes.
"""

from __future__ import annotations

import email
import email.policy
import email.utils
import re
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailrelay.queue.dsn import HEADER_LIMIT, RecipientReport, build_dsn, is_bounce

ARRIVED = datetime(2026, 11, 25, 13, 12, 5, tzinfo=timezone.utc)
TRIED = ARRIVED + timedelta(hours=2)
NOW = ARRIVED + timedelta(hours=2, minutes=1)

ORIGINAL = (b"Received: from client.test ([127.0.0.1]) by relay.test with ESMTPA ;\r\n"
            b"\tWed, 25 Nov 2026 13:12:05 +0000\r\n"
            b"From: carol@example.com\r\n"
            b"To: bob@far.test\r\n"
            b"Subject: quarterly figures\r\n"
            b"Message-ID: <q3@example.com>\r\n"
            b"\r\n"
            b"CONFIDENTIAL BODY: the figures are 42.\r\n"
            b"X-Looks-Like-A-Header: but is body\r\n")

TOP_HEADERS = ["From", "To", "Subject", "Date", "Message-ID", "Auto-Submitted", "MIME-Version",
               "Content-Type"]
PER_MESSAGE = {"Reporting-MTA", "Arrival-Date", "X-MailRelay-Id"}
PER_RECIPIENT = {"Final-Recipient", "Action", "Status", "Remote-MTA", "Diagnostic-Code",
                 "Last-Attempt-Date", "Will-Retry-Until"}


def failed(recipient: str = "bob@far.test", diagnostic: str = "550 5.1.1 <bob@far.test>: No such user",
           **kw) -> RecipientReport:
    kw.setdefault("remote_mta", "mx.far.test")
    return RecipientReport(recipient, "failed", kw.pop("status", "5.1.1"), diagnostic,
                           last_attempt=TRIED, **kw)


def delayed(recipient: str = "dave@slow.test") -> RecipientReport:
    return RecipientReport(recipient, "delayed", "4.4.1", "421 4.4.1 Try again later",
                           remote_mta="mx.slow.test", last_attempt=TRIED,
                           will_retry_until=ARRIVED + timedelta(days=5))


def bounce(*reports: RecipientReport, sender: str = "carol@example.com", original: bytes = ORIGINAL,
           original_id: str = "emailrelay.11970.1795612325.1") -> bytes:
    return build_dsn(reporting_mta="relay.test", sender=sender, original_content=original,
                     reports=reports or [failed()], arrival_date=ARRIVED, original_id=original_id,
                     now=NOW)


def parse(dsn: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(dsn, policy=email.policy.default)  # type: ignore[return-value]


def raw_parts(dsn: bytes) -> list[tuple[bytes, bytes]]:
    """(header section, body) of each MIME part, cut from the bytes at the boundary lines."""
    boundary = parse(dsn).get_boundary()
    assert boundary
    chunks = dsn.split(b"\r\n--" + boundary.encode())
    assert chunks[-1] == b"--\r\n", "the report must end with the closing boundary"
    parts = []
    for chunk in chunks[1:-1]:
        assert chunk.startswith(b"\r\n")
        head, _, body = chunk[2:].partition(b"\r\n\r\n")
        parts.append((head, body))
    return parts


def status_blocks(dsn: bytes) -> list[dict[str, str]]:
    """The delivery-status part as field blocks; a repeated field in a block fails the test."""
    text = raw_parts(dsn)[1][1].decode("utf-8")
    assert text.endswith("\r\n")
    blocks = []
    for chunk in text[:-2].split("\r\n\r\n"):
        fields: dict[str, str] = {}
        for line in re.sub(r"\r\n(?=[ \t])", "", chunk).split("\r\n"):
            name, colon, value = line.partition(":")
            assert colon and re.fullmatch(r"[!-9;-~]+", name), f"not a field: {line!r}"
            assert name not in fields, f"{name} appears twice in one block"
            fields[name] = value.strip()
        blocks.append(fields)
    return blocks


def explanation(msg: email.message.EmailMessage) -> str:
    """The human-readable part, unwrapped."""
    return " ".join(next(msg.iter_parts()).get_content().split())


def unescape(text: str) -> str:
    return re.sub(r"\\x\{([0-9A-F]+)\}", lambda m: chr(int(m.group(1), 16)), text)


def test_a_failed_recipient_gets_a_three_part_delivery_report():
    msg = parse(bounce())
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in msg.iter_parts()] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    assert list(msg.keys()) == TOP_HEADERS
    assert msg["From"].addresses[0].addr_spec == "MAILER-DAEMON@relay.test"
    assert msg["From"].addresses[0].display_name == "Mail Delivery System"
    assert msg["To"].addresses[0].addr_spec == "carol@example.com"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["Message-ID"].endswith("@relay.test>")
    assert msg["Date"].datetime == NOW
    assert not msg.defects and not any(p.defects for p in msg.walk())


def test_the_explanation_names_each_recipient_and_what_the_server_said():
    msg = parse(bounce(failed(), failed("eve@far.test", "550 5.2.2 Mailbox full", status="5.2.2")))
    text = explanation(msg)
    assert "relay.test" in text
    assert "<bob@far.test>: host mx.far.test said: 550 5.1.1 <bob@far.test>: No such user" in text
    assert "<eve@far.test>: host mx.far.test said: 550 5.2.2 Mailbox full" in text
    assert "will not be retried" in text


def test_per_recipient_fields_say_what_happened():
    dsn = bounce(failed(), failed("eve@far.test", "550 5.2.2 Mailbox full", status="5.2.2",
                                  remote_mta=""))
    blocks = status_blocks(dsn)
    assert blocks[0] == {"Reporting-MTA": "dns; relay.test",
                         "Arrival-Date": "Wed, 25 Nov 2026 13:12:05 +0000",
                         "X-MailRelay-Id": "emailrelay.11970.1795612325.1"}
    assert blocks[1] == {"Final-Recipient": "rfc822; bob@far.test", "Action": "failed",
                         "Status": "5.1.1", "Remote-MTA": "dns; mx.far.test",
                         "Diagnostic-Code": "smtp; 550 5.1.1 <bob@far.test>: No such user",
                         "Last-Attempt-Date": "Wed, 25 Nov 2026 15:12:05 +0000"}
    assert blocks[2]["Final-Recipient"] == "rfc822; eve@far.test"
    assert blocks[2]["Status"] == "5.2.2"
    assert "Remote-MTA" not in blocks[2]
    assert len(blocks) == 3
    # Python's parser reads the same blocks out of message/delivery-status.
    part = list(parse(dsn).iter_parts())[1]
    assert [dict(block.items()) for block in part.get_payload()] == blocks


def test_optional_fields_are_left_out_when_not_known():
    report = RecipientReport("bob@far.test", "failed", "5.4.7")
    blocks = status_blocks(bounce(report, original_id=""))
    assert set(blocks[0]) == {"Reporting-MTA", "Arrival-Date"}
    assert blocks[1] == {"Final-Recipient": "rfc822; bob@far.test", "Action": "failed",
                         "Status": "5.4.7"}
    text = explanation(parse(bounce(report)))
    assert "<bob@far.test>: delivery status 5.4.7" in text


def test_a_failure_without_an_smtp_reply_is_not_labelled_smtp():
    report = failed(diagnostic="Domain far.test does not accept mail (null MX)", status="5.1.10",
                    remote_mta="")
    assert status_blocks(bounce(report))[1]["Diagnostic-Code"] == (
        "X-MailRelay; Domain far.test does not accept mail (null MX)")


def test_a_multi_line_reply_becomes_one_diagnostic():
    reply = "550-5.1.1 The email account that you tried to reach does not exist.\r\n550 5.1.1 Bye"
    code = status_blocks(bounce(failed(diagnostic=reply)))[1]["Diagnostic-Code"]
    assert code == ("smtp; 550-5.1.1 The email account that you tried to reach does not exist. "
                    "550 5.1.1 Bye")


def test_the_original_headers_come_back_but_never_the_body():
    dsn = bounce()
    assert b"CONFIDENTIAL" not in dsn and b"X-Looks-Like-A-Header" not in dsn
    part = list(parse(dsn).iter_parts())[2]
    headers = email.message_from_string(part.get_content(), policy=email.policy.default)
    assert headers["Subject"] == "quarterly figures"
    assert headers["Message-ID"] == "<q3@example.com>"
    assert headers["Received"].startswith("from client.test")  # folded line kept whole
    assert raw_parts(dsn)[2][1] == ORIGINAL.partition(b"\r\n\r\n")[0] + b"\r\n"


def test_a_body_without_the_blank_line_still_stays_out():
    original = b"Subject: no separator\r\nthis line is body text, not a header\r\nmore body\r\n"
    dsn = bounce(original=original)
    assert b"Subject: no separator" in dsn
    assert b"body text" not in dsn and b"more body" not in dsn


def test_bare_lf_originals_come_back_with_crlf():
    dsn = bounce(original=b"Subject: lf only\nFrom: a@b.test\n\nbody\n")
    assert raw_parts(dsn)[2][1] == b"Subject: lf only\r\nFrom: a@b.test\r\n"


def test_huge_header_sections_are_cut_at_the_limit():
    original = b"".join(b"X-Filler-%06d: %s\r\n" % (i, b"y" * 80) for i in range(2000)) + b"\r\nbody"
    dsn = bounce(original=original)
    copied = raw_parts(dsn)[2][1]
    assert HEADER_LIMIT - 200 < len(copied) <= HEADER_LIMIT
    assert all(re.fullmatch(rb"X-Filler-\d{6}: y{80}", line) for line in copied[:-2].split(b"\r\n")), \
        "only whole lines are copied"


def test_an_original_that_contains_the_boundary_cannot_split_the_report(monkeypatch):
    tokens = iter(["a" * 32, "b" * 32])
    monkeypatch.setattr("mailrelay.queue.dsn.secrets.token_hex", lambda n: next(tokens))
    dsn = bounce(original=b"Subject: trap\r\n--=_" + b"a" * 32 + b"--: x\r\n\r\nbody")
    msg = parse(dsn)
    assert msg.get_boundary() == "=_" + "b" * 32
    assert [p.get_content_type() for p in msg.iter_parts()][2] == "text/rfc822-headers"


def test_a_delay_warning_says_so_and_when_retries_stop():
    dsn = bounce(delayed())
    msg = parse(dsn)
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    block = status_blocks(dsn)[1]
    assert block["Action"] == "delayed"
    assert block["Status"] == "4.4.1"
    assert block["Will-Retry-Until"] == "Mon, 30 Nov 2026 13:12:05 +0000"
    text = explanation(msg)
    assert "still being retried" in text and "will not be retried" not in text


def test_failed_and_delayed_together_are_reported_as_undelivered():
    dsn = bounce(failed(will_retry_until=ARRIVED + timedelta(days=5)), delayed())
    assert parse(dsn)["Subject"] == "Undelivered Mail Returned to Sender"
    blocks = status_blocks(dsn)
    assert [b["Action"] for b in blocks[1:]] == ["failed", "delayed"]
    assert "Will-Retry-Until" not in blocks[1] and "Will-Retry-Until" in blocks[2]


def test_a_non_ascii_recipient_makes_the_report_international():
    dsn = bounce(failed("müller+news@far.test"), failed("bob@far.test"),
                 original=b"From: carol@example.com\r\nSubject: Gr\xc3\xbc\xc3\x9fe\r\n\r\nbody\r\n")
    msg = parse(dsn)
    assert msg.get_param("report-type") == "global-delivery-status"
    assert [p.get_content_type() for p in msg.iter_parts()] == [
        "text/plain", "message/global-delivery-status", "message/global-headers"]
    blocks = status_blocks(dsn)
    # RFC 6533 utf-8-addr-unitext: UTF-8 as is, "+" escaped; ASCII addresses stay rfc822.
    assert blocks[1]["Final-Recipient"] == "utf-8; müller\\x{2B}news@far.test"
    assert blocks[2]["Final-Recipient"] == "rfc822; bob@far.test"
    assert raw_parts(dsn)[2][1] == "From: carol@example.com\r\nSubject: Grüße\r\n".encode()
    assert "<müller+news@far.test>" in explanation(msg)


def test_a_non_ascii_sender_gets_an_international_report_addressed_in_utf8():
    sender = "jürgen@xn--exmple-cua.test"  # as E-MailRelay spools it (see shared/emailrelay-spool)
    dsn = bounce(sender=sender)
    msg = parse(dsn)
    # RFC 6532: the header is raw UTF-8 (Python's bytes parser leaves that undecoded; read it as text).
    assert f"\r\nTo: <{sender}>\r\n".encode() in dsn
    as_text = email.message_from_string(dsn.decode("utf-8"), policy=email.policy.default)
    assert as_text["To"].addresses[0].addr_spec == sender
    assert msg.get_param("report-type") == "global-delivery-status"
    assert [p.get_content_type() for p in msg.iter_parts()][1:] == [
        "message/global-delivery-status", "message/global-headers"]


def test_an_ascii_report_stays_7bit_whatever_the_server_or_the_original_sent():
    original = b"Subject: caf\xe9 latin-1 \xff\r\nFrom: a@b.test\r\n\r\nbody\r\n"
    dsn = bounce(failed(diagnostic="550 5.1.1 Benutzer unbekannt: müller"), original=original)
    assert dsn.isascii()
    msg = parse(dsn)
    assert msg.get_param("report-type") == "delivery-status"
    assert status_blocks(dsn)[1]["Diagnostic-Code"] == "smtp; 550 5.1.1 Benutzer unbekannt: m\\x{FC}ller"
    _, _, headers = msg.iter_parts()
    assert "unbekannt: müller" in explanation(msg)
    assert headers["Content-Transfer-Encoding"] == "quoted-printable"
    assert headers.get_payload(decode=True) == b"Subject: caf\xe9 latin-1 \xff\r\nFrom: a@b.test\r\n"


INJECTIONS = ["\r\nBcc: evil@attacker.test", "\nBcc: evil@attacker.test", "\rBcc: evil@attacker.test",
              "\r\n\r\nFinal-Recipient: rfc822; forged@attacker.test\r\nAction: failed",
              "\u2028Bcc: evil@attacker.test", "\x85Bcc: evil@attacker.test",
              "\x00\x0b\x0cBcc: evil@attacker.test"]


@pytest.mark.parametrize("payload", INJECTIONS, ids=range(len(INJECTIONS)))
@pytest.mark.parametrize("field", ["diagnostic", "recipient", "remote_mta"])
def test_line_breaks_in_remote_input_cannot_add_headers_or_fields(field, payload):
    values = {"recipient": "bob@far.test", "diagnostic": "550 5.1.1 No such user",
              "remote_mta": "mx.far.test"}
    values[field] += payload
    report = RecipientReport(values["recipient"], "failed", "5.1.1", values["diagnostic"],
                             values["remote_mta"])
    dsn = bounce(report)
    msg = parse(dsn)
    assert list(msg.keys()) == TOP_HEADERS
    assert "Bcc" not in msg
    for part in msg.iter_parts():
        assert "Bcc" not in part
    blocks = status_blocks(dsn)
    assert len(blocks) == 2
    assert set(blocks[1]) == {"Final-Recipient", "Action", "Status", "Remote-MTA", "Diagnostic-Code"}
    assert "forged" not in blocks[1]["Final-Recipient"] or field == "recipient"
    if field == "recipient":  # kept, escaped on its one line, so the report still names it
        assert unescape(blocks[1]["Final-Recipient"].split("; ", 1)[1]) == values["recipient"]


def test_undecodable_bytes_in_an_address_are_escaped():
    broken = b"b\xffob@far.test".decode("utf-8", "surrogateescape")
    blocks = status_blocks(bounce(failed(broken)))
    assert blocks[1]["Final-Recipient"] == "utf-8; b\\x{DCFF}ob@far.test"


def _lines(dsn: bytes) -> list[bytes]:
    assert dsn.endswith(b"\r\n")
    return dsn[:-2].split(b"\r\n")


@pytest.mark.parametrize("case", ["ascii", "international", "hostile"])
def test_every_line_ends_in_crlf_and_fits_in_998_octets(case):
    if case == "ascii":
        dsn = bounce(failed(), delayed())
    elif case == "international":
        dsn = bounce(failed("müller@far.test", "550 5.1.1 " + "ü" * 3000), sender="jürgen@x.test",
                     original=b"Subject: " + "ä".encode() * 2000 + b"\r\n\r\nbody")
    else:
        dsn = bounce(failed("x" * 1500 + "@far.test", "550 " + "y" * 5000, remote_mta="m" * 1200),
                     *[failed(f"r{i}@far.test") for i in range(50)],
                     original=b"Subject: " + b"z" * 3000 + b"\r\nX-Bin: \x00\x01\r\n\r\nbody")
    for line in _lines(dsn):
        assert b"\r" not in line and b"\n" not in line
        assert len(line) <= 998
    assert parse(dsn).get_content_type() == "multipart/report"


def test_long_words_are_split_without_losing_text():
    dsn = bounce(failed(diagnostic="550 " + "y" * 5000))
    code = status_blocks(dsn)[1]["Diagnostic-Code"]
    assert code.replace(" ", "") == "smtp;550" + "y" * 5000


def test_every_report_has_its_own_message_id():
    assert parse(bounce())["Message-ID"] != parse(bounce())["Message-ID"]


@settings(max_examples=150, deadline=None)
@given(recipient=st.text(min_size=1, max_size=80), diagnostic=st.text(max_size=300),
       remote_mta=st.text(max_size=40))
def test_whatever_the_remote_input_the_structure_holds(recipient, diagnostic, remote_mta):
    dsn = bounce(RecipientReport(recipient, "failed", "5.0.0", diagnostic, remote_mta))
    msg = parse(dsn)
    assert list(msg.keys())[:len(TOP_HEADERS)] == TOP_HEADERS
    assert len(list(msg.iter_parts())) == 3
    blocks = status_blocks(dsn)
    assert len(blocks) == 2 and set(blocks[0]) == PER_MESSAGE and set(blocks[1]) <= PER_RECIPIENT
    assert blocks[1]["Action"] == "failed" and blocks[1]["Status"] == "5.0.0"
    for line in _lines(dsn):
        assert b"\r" not in line and b"\n" not in line and len(line) <= 998


def test_reports_are_never_sent_to_the_null_reverse_path():
    for null in ("", "<>"):
        assert is_bounce(null)
        with pytest.raises(ValueError, match="null reverse-path"):
            bounce(sender=null)
    assert not is_bounce("carol@example.com")


@pytest.mark.parametrize("kwargs, message", [
    ({"sender": "carol@example.com\r\nBcc: evil@x"}, "cannot send a report"),
    ({"reporting_mta": "relay.test\r\nBcc: evil@x"}, "not a host name"),
    ({"original_id": "id\r\nBcc: evil@x"}, "not printable"),
    ({"reports": []}, "nothing to report"),
    ({"arrival_date": datetime(2026, 11, 25)}, "no time zone"),
])
def test_unusable_arguments_are_refused(kwargs, message):
    args = dict(reporting_mta="relay.test", sender="carol@example.com", original_content=ORIGINAL,
                reports=[failed()], arrival_date=ARRIVED, now=NOW)
    with pytest.raises(ValueError, match=message):
        build_dsn(**{**args, **kwargs})


@pytest.mark.parametrize("status", ["5.1", "6.0.0", "5.1.1\r\nBcc: x", "550", ""])
def test_a_report_needs_an_enhanced_status_code(status):
    with pytest.raises(ValueError, match="RFC 3463"):
        RecipientReport("bob@far.test", "failed", status)
