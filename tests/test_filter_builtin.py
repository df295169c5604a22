"""msgid:, split: and mx: through a real relay: what lands in the spool and what reaches the next hop."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import submit, wait_until
from mailrelay.spool import Envelope
from mailrelay_plugins.filters.builtin import has_message_id
from mailrelay_plugins.filters.routing_filters import parse_forward_to

NO_ID = b"From: a@example.test\r\nSubject: no id\r\n\r\nbody\r\n"


def send(port: int, recipients: list[str], body: bytes = NO_ID) -> tuple[int, str]:
    return submit(port, body, recipients=recipients)


def spooled(spool: Path, state: str = "") -> dict[str, tuple[Envelope, bytes]]:
    suffix = ".envelope" + (f".{state}" if state else "")
    out = {}
    for path in spool.glob(f"*{suffix}"):
        message_id = path.name[:-len(suffix)]
        out[message_id] = (Envelope.from_bytes(path.read_bytes()), (spool / f"{message_id}.content").read_bytes())
    return out


def fields(envelope: Envelope, name: str) -> list[str]:
    return [value for field, value in envelope.extra if field == name]


# ---------------------------------------------------------------- msgid:
def test_msgid_adds_a_unique_message_id_only_where_there_is_none(relay_process):
    relay = relay_process("--filter", "msgid:")
    assert send(relay.port, ["x@far.test"])[0] == 250
    assert send(relay.port, ["x@far.test"])[0] == 250
    assert send(relay.port, ["x@far.test"], b"message-ID: <mine@example.test>\r\nSubject: s\r\n\r\nb\r\n")[0] == 250
    assert send(relay.port, ["x@far.test"], b"Subject: s\r\n\r\nMessage-ID: <in-body@x>\r\n")[0] == 250
    contents = [content for _, content in spooled(relay.spool).values()]
    added = sorted(c.split(b"\r\n", 1)[0] for c in contents if c.startswith(b"Message-ID: <"))
    assert len(added) == 3 and len(set(added)) == 3
    assert all(line.endswith(b"@relay.test>") for line in added)
    [kept] = [c for c in contents if b"<mine@example.test>" in c]
    assert kept.lower().count(b"message-id:") == 1


def test_msgid_as_a_client_filter_edits_the_forwarded_message(relay_process, sink):
    target = sink()
    relay = relay_process("--client-filter", "msgid:", "--forward-to", f"127.0.0.1:{target.port}")
    assert send(relay.port, ["x@far.test"])[0] == 250
    [received] = target.wait_for(1)
    assert received.message["Message-ID"].endswith("@relay.test>")


header_names = st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,15}", fullmatch=True).filter(lambda n: n.lower() != "message-id")
header_values = st.from_regex(r"[ -~]{0,30}", fullmatch=True)


@given(st.lists(st.tuples(header_names, header_values), max_size=8), st.integers(0, 8),
       st.sampled_from(["Message-ID", "message-id", "MESSAGE-ID", "Message-Id "]), st.binary(max_size=50))
def test_a_message_id_field_is_found_wherever_it_is_in_the_header_but_not_in_the_body(headers, at, spelling, body):
    lines = [f"{name}: {value}".encode() for name, value in headers]
    without = b"\r\n".join(lines) + b"\r\n\r\n" + b"Message-ID: <body@x>\r\n" + body
    assert has_message_id(without) is False
    lines.insert(min(at, len(lines)), f"{spelling}: <id@x>".encode())
    assert has_message_id(b"\r\n".join(lines) + b"\r\n\r\n" + body) is True


# ---------------------------------------------------------------- split:
def test_split_makes_one_message_per_domain_with_forward_to(relay_process):
    relay = relay_process("--filter", "split:")
    rcpts = ["a@one.test", "b@Two.test", "c@two.test", "d@three.test", "e@ONE.test"]
    assert send(relay.port, rcpts)[0] == 250
    messages = spooled(relay.spool)
    assert len(messages) == 3
    by_forward_to = {env.forward_to.lower(): [r.address for r in env.recipients] for env, _ in messages.values()}
    assert by_forward_to == {"one.test": ["a@one.test", "e@ONE.test"], "two.test": ["b@Two.test", "c@two.test"],
                             "three.test": ["d@three.test"]}
    contents = {content for _, content in messages.values()}
    assert len(contents) == 1  # the same message, Received: header and all
    for envelope, _ in messages.values():
        assert fields(envelope, "SplitGroupCount") == ["3"]
        assert sorted(fields(envelope, "SplitGroup")) == sorted(messages)


def test_split_raw_compares_domains_exactly_and_a_port_word_goes_into_forward_to(relay_process):
    relay = relay_process("--filter", "split:raw;2525")
    assert send(relay.port, ["a@Two.test", "b@two.test"])[0] == 250
    forward_to = sorted(env.forward_to for env, _ in spooled(relay.spool).values())
    assert forward_to == ["Two.test:2525", "two.test:2525"]


def test_split_of_a_single_domain_only_sets_forward_to(relay_process):
    relay = relay_process("--filter", "split:")
    assert send(relay.port, ["a@one.test", "b@one.test"])[0] == 250
    [(envelope, _)] = spooled(relay.spool).values()
    assert envelope.forward_to == "one.test" and not fields(envelope, "SplitGroup")


# ---------------------------------------------------------------- mx:
def test_split_and_mx_route_each_piece_to_its_domains_mail_server(relay_process, sink, dns_server):
    target = sink()
    host, port = dns_server
    # --forward-to points nowhere: every piece must go where mx: sent it.
    relay = relay_process("--filter", f"split:{target.port}", "--client-filter", f"mx:{host}:{port}",
                          "--forward-to", "127.0.0.1:9")
    assert send(relay.port, ["u@example.test", "v@EXAMPLE.test", "w@nomx.test"])[0] == 250
    received = target.wait_for(2)
    assert sorted(sorted(r.recipients) for r in received) == [["u@example.test", "v@EXAMPLE.test"], ["w@nomx.test"]]
    assert f"forward-to-address=127.0.0.1:{target.port}" in relay.log
    wait_until(lambda: not list(relay.spool.glob("*.content")), what="the spool to empty")


def test_mx_uses_the_relays_resolver_by_default(tmp_path, relay_process, sink, dns_server):
    target = sink()
    host, port = dns_server
    conf = tmp_path / "relay.conf"
    conf.write_text(f'[dns]\nnameservers = ["{host}:{port}"]\n')
    relay = relay_process("-c", str(conf), "--filter", f"split:{target.port}", "--client-filter", "mx:",
                          "--forward-to", "127.0.0.1:9")
    assert send(relay.port, ["u@example.test"])[0] == 250
    assert target.wait_for(1)[0].recipients == ["u@example.test"]


def test_mx_dns_failure_is_temporary_and_the_message_waits(relay_process, sink, dns_servfail):
    target = sink()
    host, port = dns_servfail
    relay = relay_process("--filter", f"split:{target.port}", "--client-filter", f"mx:{host}:{port}",
                          "--forward-to", f"127.0.0.1:{target.port}")
    assert send(relay.port, ["u@example.test"])[0] == 250
    wait_until(lambda: "deferred 1 recipient(s)" in relay.log, what="the message to be deferred")
    assert "DNS lookup for example.test failed, will retry" in relay.log
    [(envelope, _)] = wait_until(lambda: spooled(relay.spool).values(), what="the message back in the queue")
    assert envelope.forward_to_address == "" and not list(relay.spool.glob("*.bad"))
    assert target.received == []


def test_mx_for_a_domain_that_does_not_exist_fails_the_message(relay_process, dns_server):
    host, port = dns_server
    relay = relay_process("--filter", "split:", "--client-filter", f"mx:{host}:{port}",
                          "--forward-to", "127.0.0.1:9")
    assert send(relay.port, ["u@nosuchdomain.test"])[0] == 250
    bad = wait_until(lambda: spooled(relay.spool, "bad"), what="the message to fail")
    [(envelope, _)] = [m for m in bad.values() if m[0].sender == "a@example.test"]
    assert "No mail server for nosuchdomain.test" in envelope.reason


def test_mx_at_the_server_stage_rejects_mail_for_a_domain_without_mail_servers(relay_process, dns_server):
    host, port = dns_server
    relay = relay_process("--filter", f"split:,mx:{host}:{port}")
    code, reply = send(relay.port, ["u@nullmx.test"])
    assert code == 550 and "nullmx.test" in reply
    assert send(relay.port, ["u@example.test"])[0] == 250
    [(envelope, _)] = spooled(relay.spool).values()
    assert envelope.forward_to_address == "127.0.0.1:25"


@pytest.mark.parametrize("spec", ["mx:nst=x", "mx:bogus", "split:nope", "msgid:x"])
def test_bad_specs_stop_start_up(relay_process, spec):
    relay = relay_process("--filter", spec, wait=False)
    assert relay.proc.wait(20) != 0
    assert spec in relay.log


@pytest.mark.parametrize("value, expected", [
    ("example.test", ("example.test", 25)), ("example.test:2525", ("example.test", 2525)),
    ("postmaster@example.test:26", ("example.test", 26)), ("192.0.2.1:587", ("[192.0.2.1]", 587)),
    ("[192.0.2.1]", ("[192.0.2.1]", 25)), ("::1", ("[IPv6:::1]", 25)), ("[IPv6:::1]:40", ("[IPv6:::1]", 40)),
])
def test_forward_to_values(value, expected):
    assert parse_forward_to(value) == expected
