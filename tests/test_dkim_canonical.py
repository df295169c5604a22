"""The signer's own shortcuts agree with the references: relaxed canonicalisation with dkimpy's,
for any body and header; the From: domains with the standard library's address parser; and a
message with bare line ends is signed as the SMTP client will send it (CRLF only)."""

from __future__ import annotations

import email.utils

import dkim
import pytest
from dkim.canonicalization import Relaxed
from hypothesis import given, settings
from hypothesis import strategies as st

from mailrelay_plugins.mailauth import headers, keys, signing

PIECES = st.sampled_from([b" ", b"  ", b"\t", b" \t ", b"a", b"word", b"\r\n", b"\r\n\r\n", b" \r\n", b"\t\r\n",
                          b"\r", b"\n", b"x\ty", b"\xc3\xa9", b"."])
KEY = keys.DkimKey("sign.test", "ed1", "ed25519", keys.generate("ed25519"))
RECORD = KEY.txt_record.encode()


@settings(max_examples=2000, deadline=None)
@given(st.lists(PIECES, max_size=40))
def test_relaxed_body_matches_dkimpy(pieces):
    body = b"".join(pieces)
    assert signing.relaxed_body(body) == Relaxed.canonicalize_body(body)


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([b"Subject", b"FROM", b"To "]), st.lists(PIECES, max_size=12)),
                max_size=5))
def test_relaxed_headers_match_dkimpy(fields):
    headers = [(name, b"".join(value) + b"\r\n") for name, value in fields]
    assert signing.relaxed_headers(headers) == Relaxed.canonicalize_headers(headers)


@settings(max_examples=200, deadline=None)
@given(st.lists(PIECES, max_size=30))
def test_any_body_signed_by_us_verifies_with_dkimpy(pieces):
    content = b"From: <a@sign.test>\r\nSubject: s  t\t\r\n\r\n" + b"".join(pieces)
    signed = signing.Signer([KEY], ["from", "subject"], ["from"]).sign(content).content
    assert signed is not None
    assert b"\n" not in signed.replace(b"\r\n", b"") and b"\r" not in signed.replace(b"\r\n", b"")
    assert dkim.verify(signed, dnsfunc=lambda _name, timeout=5: RECORD)



@pytest.mark.parametrize("value", ["Bench <bench@source.test>", "bench@source.test", "<a@b.test>",
                                   '"Doe, J" <j@x.test>', "a@x.test, b@y.test", "J. Doe <j@Sub.Example.TEST>",
                                   "(comment) a@b.test", "a@localhost", "Name <a@b.test> trailing", "=?utf-8?q?A?= <a@b.test>"])
def test_from_domains_agree_with_the_standard_librarys_parser(value):
    fields, _ = headers.split(f"From: {value}\r\n\r\nbody".encode())
    expected = [a.rpartition("@")[2].lower() if "@" in a else "" for _, a in email.utils.getaddresses([value])]
    assert headers.from_domains(fields) == (list(dict.fromkeys(expected)), 1)
