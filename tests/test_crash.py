"""Crash safety: SIGKILL the daemon in the middle of a flood; every acknowledged message survives."""

from __future__ import annotations

import email
import signal
import smtplib
import threading
import time

import pytest

from mailrelay.spool import Envelope, Spool

CONNECTIONS = 20


def flood(port: int, worker: int, acknowledged: list[str], stop: threading.Event) -> None:
    n = 0
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.ehlo("flood.test")
            while not stop.is_set():
                n += 1
                message_id = f"<crash-{worker}-{n}@flood.test>"
                body = (f"From: w{worker}@flood.test\r\nTo: sink@example.test\r\nMessage-ID: {message_id}\r\n"
                        f"Subject: flood {worker}/{n}\r\n\r\n" + "payload line\r\n" * 40 + "END\r\n")
                client.sendmail(f"w{worker}@flood.test", ["sink@example.test"], body.encode())
                acknowledged.append(message_id)  # only after the 250 arrived
    except (smtplib.SMTPException, OSError):
        return  # the server died under us: that is the point


@pytest.mark.slow
def test_sigkill_mid_flood_loses_no_acknowledged_message(relay_process, tmp_path):
    relay = relay_process()
    acknowledged: list[str] = []
    stop = threading.Event()
    threads = [threading.Thread(target=flood, args=(relay.port, i, acknowledged, stop)) for i in range(CONNECTIONS)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while len(acknowledged) < 300 and time.monotonic() < deadline:
        time.sleep(0.01)
    relay.proc.send_signal(signal.SIGKILL)
    relay.proc.wait(10)
    stop.set()
    for t in threads:
        t.join(15)
    assert len(acknowledged) >= 300, "the flood never got going"

    spool = Spool(relay.spool)
    stored: dict[str, bytes] = {}
    for message_id in spool.ids():
        envelope = Envelope.from_bytes(spool.envelope_path(message_id).read_bytes())  # has End: 1
        assert envelope.recipients and envelope.recipients[0].address == "sink@example.test"
        content = spool.read_content(message_id)
        parsed = email.message_from_bytes(content)
        assert content.endswith(b"END\r\n"), f"{message_id}: truncated content"
        stored[parsed["Message-ID"]] = content
    missing = [m for m in acknowledged if m not in stored]
    assert not missing, f"{len(missing)} acknowledged messages lost, e.g. {missing[:3]}"
    # Anything the crash interrupted is at most a .envelope.new, which is never "ready".
    leftovers = [p.name for p in relay.spool.iterdir() if p.name.endswith(".envelope.new")]
    assert not set(n[: -len(".envelope.new")] for n in leftovers) & set(spool.ids())

    # The relay starts again on the same spool and keeps serving.
    again = relay_process(spool=relay.spool)
    with smtplib.SMTP("127.0.0.1", again.port) as client:
        client.sendmail("a@example.test", ["b@example.test"], b"Subject: after the crash\r\n\r\nok\r\n")
    assert len(Spool(relay.spool).ids()) == len(stored) + 1
