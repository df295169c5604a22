"""What RETR and TOP send for a stored message, checked against the rules of RFC 1939 on any bytes:
CRLF lines, byte-stuffing that a client's un-stuffing undoes, and sizes (what STAT and LIST say)
equal to what RETR sends before stuffing; plus maildir names (UIDL, the seen flag)."""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from mailrelay_plugins.pop3.mailbox import uid_for
from mailrelay_plugins.pop3.maildir import unique_name, with_seen_flag
from mailrelay_plugins.pop3.wire import WireReader, open_message, wire_size

# Bytes that matter to the rules: line ends, dots, and something else.
CONTENT = st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"..", b"a", b"From x", b"\r\n\r\n"]),
                   max_size=60).map(b"".join)
CHUNKS = st.integers(min_value=1, max_value=9)


def sent(path: Path, body_lines: int | None = None, chunk: int = 4) -> bytes:
    reader = WireReader(open_message(path), body_lines, chunk=chunk)
    try:
        parts = []
        while data := reader.read():
            parts.append(data)
        return b"".join(parts)
    finally:
        reader.close()


def unstuff(data: bytes) -> bytes:
    """What a client does with a multi-line response (RFC 1939 3): drop one leading dot per line."""
    lines = data.split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


def stored(tmp_path: Path, content: bytes) -> Path:
    path = tmp_path / "message"
    path.write_bytes(content)
    return path


@settings(max_examples=300, deadline=None)
@given(content=CONTENT, chunk=CHUNKS)
def test_retr_sends_crlf_lines_stuffed_and_exactly_the_listed_size(tmp_path_factory, content, chunk):
    path = stored(tmp_path_factory.mktemp("m"), content)
    wire = sent(path, chunk=chunk)
    plain = unstuff(wire)
    assert len(plain) == wire_size(path, chunk=chunk)  # LIST's octet count, before stuffing
    if content:
        assert wire.endswith(b"\r\n")                 # so ".\r\n" can follow
    assert b"\n" not in plain.replace(b"\r\n", b"")    # no bare LF on the wire
    for line in wire.split(b"\r\n"):
        assert not (line.startswith(b".") and not line.startswith(b".."))  # every dot line is stuffed
    # Nothing but line ends changed: a CRLF file is sent as it is stored.
    assert plain.replace(b"\r\n", b"\n") == content.replace(b"\r\n", b"\n") + (
        b"" if not content or content.endswith(b"\n") else b"\n")


@settings(max_examples=200, deadline=None)
@given(content=CONTENT, chunk=CHUNKS, lines=st.integers(min_value=0, max_value=5))
def test_top_sends_the_headers_the_blank_line_and_n_body_lines(tmp_path_factory, content, chunk, lines):
    path = stored(tmp_path_factory.mktemp("m"), content)
    full = unstuff(sent(path, chunk=chunk))
    top = unstuff(sent(path, lines, chunk=chunk))
    assert full.startswith(top)
    separator = full.find(b"\r\n\r\n") + 4 if not full.startswith(b"\r\n") else 2
    if b"\r\n\r\n" not in full and not full.startswith(b"\r\n"):
        assert top == full  # no body: everything is header
        return
    headers, body = full[:separator], full[separator:]
    expected = headers + b"".join(line + b"\r\n" for line in body.split(b"\r\n")[:-1][:lines])
    assert top == expected


def test_a_message_with_dot_lines_and_bare_line_feeds(tmp_path):
    path = stored(tmp_path, b"Subject: x\n\n.hidden\n..two\nend")
    assert sent(path) == b"Subject: x\r\n\r\n..hidden\r\n...two\r\nend\r\n"
    assert wire_size(path) == len(b"Subject: x\r\n\r\n.hidden\r\n..two\r\nend\r\n")


def test_symbolic_links_are_not_followed(tmp_path):
    secret = stored(tmp_path, b"not mail\r\n")
    link = tmp_path / "link"
    link.symlink_to(secret)
    try:
        open_message(link)
    except OSError:
        pass
    else:
        raise AssertionError("a symbolic link in a mailbox was read")


def test_maildir_names_keep_their_uid_through_flags_and_size_fields():
    name = "1700000000.M1P2Q3R4.host"
    assert unique_name(name) == name
    assert unique_name(f"{name}:2,S") == name
    assert unique_name(f"{name},S=1234,W=1260:2,RS") == name
    assert with_seen_flag(name) == f"{name}:2,S"
    assert with_seen_flag(f"{name}:2,R") == f"{name}:2,RS"
    assert with_seen_flag(f"{name}:2,S") == f"{name}:2,S"


@given(st.text(min_size=1, max_size=120))
def test_a_uid_is_always_what_rfc_1939_allows(name):
    uid = uid_for(name)
    assert 1 <= len(uid) <= 70 and all(0x21 <= ord(c) <= 0x7E for c in uid)
    assert uid_for(name) == uid  # the same in every session


def test_the_size_of_a_large_bare_lf_message_counts_the_crs_it_is_sent_with(tmp_path):
    big = stored(tmp_path, (b"x" * 998 + b"\n") * 3000)  # 3 MB, bare LFs
    assert wire_size(big) == os.path.getsize(big) + 3000
