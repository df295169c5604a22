"""The X-Archive-Id stamper against a real relay (mailrelay's pytest plugin: fixtures relay, sink)."""

import re

import pytest

from mailrelay_sdk.testing import assert_accepted, assert_delivered

from mailrelay_archive_id import stamp

ID = re.compile(r"mx1-[0-9a-f]{32}")


@pytest.fixture
def relay_plugins():
    """The plugins the relay under test enables (installed ones, by entry-point name)."""
    return ["archive-id"]


@pytest.fixture
def relay_config():
    """relay.conf for the relay under test, as a dict."""
    return {"archive_id": {"prefix": "mx1-"}}


def test_the_spooled_message_carries_an_archive_id(relay):
    spool_id = assert_accepted(relay.send(subject="Invoice 42"))
    content = relay.spool.read_content(spool_id).decode()
    [value] = re.findall(r"^X-Archive-Id: (.*)\r$", content, re.M)
    assert ID.fullmatch(value)
    assert "Subject: Invoice 42" in content


def test_each_message_gets_its_own_id_and_a_client_cannot_choose_one(relay):
    forged = b"X-Archive-Id: forged\r\nX-Archive-ID: also\r\n forged\r\nSubject: hi\r\n\r\nbody\r\n"
    ids = set()
    for _ in range(3):
        content = relay.spool.read_content(assert_accepted(relay.send(forged))).decode()
        assert "forged" not in content
        ids.update(re.findall(r"^X-Archive-Id: (.*)\r$", content, re.M))
    assert len(ids) == 3 and all(ID.fullmatch(i) for i in ids)


def test_the_forwarded_message_carries_it(relay, sink):
    assert_accepted(relay.send(recipients=["archive@example.org"]))
    message = assert_delivered(sink, to="archive@example.org").message
    assert ID.fullmatch(message["X-Archive-Id"])


def test_stamp_keeps_the_body_and_other_headers():
    content = b"Subject: a\r\nX-Archive-Id: old\r\n\tcontinued\r\nTo: b@example.test\r\n\r\nX-Archive-Id: in body\r\n"
    assert stamp(content, "X-Archive-Id", "new") == (
        b"X-Archive-Id: new\r\nSubject: a\r\nTo: b@example.test\r\n\r\nX-Archive-Id: in body\r\n")
