"""E-MailRelay's --anonymous: say less about the relay (greeting, EHLO, VRFY, Received:)."""

from __future__ import annotations

import smtplib

from conftest import spooled_contents, submit
from test_forward_modes import relay_cli

MSG = b"From: a@example.test\r\nSubject: quiet\r\n\r\nhi\r\n"


def conversation(port: int) -> tuple[str, int]:
    """The first line of the EHLO reply, and the VRFY reply code."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        _, ehlo = client.ehlo("client.test")
        vrfy_code, _ = client.docmd("VRFY", "<someone@relay.test>")
        return ehlo.decode().splitlines()[0], vrfy_code


def greeting(port: int) -> str:
    client = smtplib.SMTP()
    code, text = client.connect("127.0.0.1", port)
    client.close()
    return text.decode()


def test_anonymous_hides_the_product_the_vrfy_answer_and_the_received_line(relay_process):
    relay = relay_process("--anonymous")
    assert greeting(relay.port) == "relay.test ESMTP"
    first_ehlo_line, vrfy = conversation(relay.port)
    assert first_ehlo_line == "relay.test" and vrfy == 502
    assert submit(relay.port, MSG)[0] == 250
    (content,) = spooled_contents(relay.spool)
    assert content == MSG  # no Received: line added


def test_without_anonymous_the_relay_says_who_it_is(relay_process):
    relay = relay_process()
    assert greeting(relay.port) == "relay.test ESMTP mailrelay"
    first_ehlo_line, vrfy = conversation(relay.port)
    assert first_ehlo_line == "relay.test greets client.test" and vrfy == 252
    assert submit(relay.port, MSG)[0] == 250
    (content,) = spooled_contents(relay.spool)
    assert content.startswith(b"Received: from ")  # submit() uses smtplib's own EHLO name


def test_anonymous_scopes_from_the_command_line_and_an_options_file(relay_process, tmp_path):
    relay = relay_process("--anonymous=vrfy")
    assert greeting(relay.port) == "relay.test ESMTP mailrelay"
    assert conversation(relay.port)[1] == 502
    assert submit(relay.port, MSG)[0] == 250
    assert spooled_contents(relay.spool)[0].startswith(b"Received: ")
    options = tmp_path / "emailrelay.conf"
    options.write_text("anonymous server,content\n")
    relay = relay_process(str(options))
    assert greeting(relay.port) == "relay.test ESMTP"
    assert conversation(relay.port)[1] == 252   # vrfy not in the scope
    assert submit(relay.port, MSG)[0] == 250
    assert spooled_contents(relay.spool)[0] == MSG


def test_an_unknown_scope_is_a_readable_error(tmp_path):
    result = relay_cli("--no-daemon", "--port", "0", "--spool-dir", str(tmp_path / "s"), "--anonymous=everything")
    assert result.returncode != 0
    assert "--anonymous: unknown scope 'everything'" in result.stderr and "Traceback" not in result.stderr
