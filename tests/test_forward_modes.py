"""E-MailRelay's forwarding modes and our MX routing, with real processes and a real DNS server."""

from __future__ import annotations

import signal
import smtplib
import subprocess
import sys
import time

import pytest

from mailrelay.spool import Spool
from mailrelay_sdk.testing import RunningRelay
from sinks import Behaviour
from test_forward import MSG, wait_until


def fill(spool_dir, count: int, recipients=("x@far.test",), sender="a@example.test") -> None:
    """Spool messages with a storage-only relay (no forwarding), as `emailrelay --as-server` would."""
    with RunningRelay(spool_dir) as store:
        with smtplib.SMTP("127.0.0.1", store.port) as client:
            for n in range(count):
                client.sendmail(sender, list(recipients), MSG.replace(b"fw1", b"m%d" % n))


def relay_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mailrelay", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_as_client_forwards_the_spool_and_exits_0(tmp_path, sink):
    target = sink()
    spool_dir = tmp_path / "spool"
    fill(spool_dir, 5)
    result = relay_cli("--as-client", f"127.0.0.1:{target.port}", "--spool-dir", str(spool_dir))
    assert result.returncode == 0, result.stderr
    assert "forwarded 5 message(s): 5 delivered, 0 deferred, 0 failed" in result.stdout
    assert sorted(r.message["Message-ID"] for r in target.received) == [f"<m{n}@example.test>" for n in range(5)]
    assert list(spool_dir.iterdir()) == []


def test_as_client_exits_1_when_anything_fails(tmp_path, sink):
    target = sink(Behaviour(refuse={"nobody": "550 5.1.1 no such user", "later": "451 4.2.1 busy"}))
    spool_dir = tmp_path / "spool"
    fill(spool_dir, 1, recipients=("ok@far.test", "nobody@far.test"))
    fill(spool_dir, 1, recipients=("later@far.test",))
    result = relay_cli("--as-client", f"127.0.0.1:{target.port}", "--spool-dir", str(spool_dir))
    assert result.returncode == 1, result.stdout + result.stderr
    spool = Spool(spool_dir)
    assert len(spool.ids("bad")) == 1           # the refused recipient
    assert len(spool.ids("ready")) == 1         # the deferred one waits for the next run
    senders = sorted(r.sender for r in target.received)
    assert senders == ["", "a@example.test"]    # the delivered copy, and the bounce (forwarded in the same pass)


def test_mx_routing_end_to_end(inprocess_relay, sink, dns_server):
    target = sink()
    host, port = dns_server
    relay = inprocess_relay(enable=["forward"], config={
        "forward": {"to": "mx", "mx_port": target.port}, "queue": {"retry": ["1h"]},
        "dns": {"nameservers": [f"{host}:{port}"], "timeout": 2, "attempts": 1}})
    with smtplib.SMTP("127.0.0.1", relay.port) as client:
        client.sendmail("a@example.test", ["u@example.test", "v@nullmx.test", "w@nosuchdomain.test"], MSG)
    received = target.wait_for(2)
    delivered = next(r for r in received if r.sender == "a@example.test")
    assert delivered.recipients == ["u@example.test"]
    bounce = next(r for r in received if r.sender == "")
    text = bounce.content.decode()
    assert bounce.recipients == ["a@example.test"]
    assert "v@nullmx.test" in text and "Status: 5.1.10" in text
    assert "w@nosuchdomain.test" in text and "Status: 5.1.2" in text


def test_dns_timeout_is_a_temporary_failure(inprocess_relay, sink, dns_server):
    target = sink()
    host, port = dns_server
    relay = inprocess_relay(enable=["forward"], config={
        "forward": {"to": "mx", "mx_port": target.port}, "queue": {"retry": ["1h"]},
        "dns": {"nameservers": [f"{host}:{port}"], "timeout": 0.5, "attempts": 1}})
    with smtplib.SMTP("127.0.0.1", relay.port) as client:
        client.sendmail("a@example.test", ["x@slow.timeout.test"], MSG)
    message_id = wait_until(lambda: relay.spool.ids() and (relay.spool.directory / f"{relay.spool.ids()[0]}.retry").exists()
                            and relay.spool.ids()[0], what="a deferred message")
    assert "4.4.3" in (relay.spool.directory / f"{message_id}.retry").read_text()
    assert target.received == []


def test_forward_on_disconnect(inprocess_relay, sink):
    target = sink()
    relay = inprocess_relay(enable=["forward"], config={
        "forward": {"to": f"127.0.0.1:{target.port}"}, "queue": {"after_receive": False, "on_disconnect": True}})
    client = smtplib.SMTP("127.0.0.1", relay.port)
    client.sendmail("a@example.test", ["x@far.test"], MSG)
    client.sendmail("a@example.test", ["y@far.test"], MSG)
    time.sleep(0.5)
    assert target.received == []  # still connected: nothing forwarded yet
    client.quit()
    assert len(target.wait_for(2)) == 2


def test_poll_interval(inprocess_relay, sink):
    target = sink()
    relay = inprocess_relay(enable=["forward"], config={
        "forward": {"to": f"127.0.0.1:{target.port}"}, "queue": {"after_receive": False, "poll": 1}})
    with smtplib.SMTP("127.0.0.1", relay.port) as client:
        client.sendmail("a@example.test", ["x@far.test"], MSG)
    started = time.monotonic()
    target.wait_for(1, timeout=5)
    assert time.monotonic() - started < 3


def test_forward_at_start(tmp_path, sink):
    target = sink()
    spool_dir = tmp_path / "spool"
    fill(spool_dir, 3)
    with RunningRelay(spool_dir, enable=["forward"], config={
            "forward": {"to": f"127.0.0.1:{target.port}"}, "queue": {"after_receive": False, "at_start": True}}):
        assert len(target.wait_for(3)) == 3


def test_two_relays_sharing_a_spool_never_send_a_message_twice(tmp_path, sink):
    target = sink()
    spool_dir = tmp_path / "spool"
    fill(spool_dir, 60)
    config = {"forward": {"to": f"127.0.0.1:{target.port}"}, "queue": {"at_start": True, "concurrency": 8}}
    with RunningRelay(spool_dir, enable=["forward"], config=config), \
            RunningRelay(spool_dir, enable=["forward"], config=config):
        received = target.wait_for(60)
        time.sleep(0.5)
    ids = [r.message["Message-ID"] for r in target.received]
    assert len(ids) == 60 and len(set(ids)) == 60


@pytest.mark.slow
def test_crash_mid_delivery_loses_nothing(tmp_path, sink, relay_process):
    behaviour = Behaviour(stall_in_data=30)
    target = sink(behaviour)
    spool_dir = tmp_path / "spool"
    relay = relay_process("--forward-to", f"127.0.0.1:{target.port}", spool=spool_dir)
    with smtplib.SMTP("127.0.0.1", relay.port) as client:
        client.sendmail("a@example.test", ["x@far.test"], MSG)
    wait_until(lambda: list(spool_dir.glob("*.envelope.busy")), what="the message in flight")
    time.sleep(0.3)  # inside DATA at the sink
    relay.proc.send_signal(signal.SIGKILL)
    relay.proc.wait(10)
    assert list(spool_dir.glob("*.envelope.busy"))  # left behind by the crash
    behaviour.stall_in_data = 0
    time.sleep(2.1)  # older than claim.STALE_AFTER
    relay_process("--forward-to", f"127.0.0.1:{target.port}", spool=spool_dir)
    [got] = target.wait_for(1)
    assert got.recipients == ["x@far.test"]
    wait_until(lambda: not list(spool_dir.iterdir()), what="an empty spool")


def test_immediate_gives_the_client_the_next_hops_answer(inprocess_relay, sink):
    target = sink(Behaviour(refuse={"nobody": "550 5.1.1 no such user", "later": "451 4.2.1 busy"}))
    relay = inprocess_relay(enable=["forward"], config={
        "forward": {"to": f"127.0.0.1:{target.port}"}, "queue": {"immediate": True}})
    with smtplib.SMTP("127.0.0.1", relay.port) as client:
        client.sendmail("a@example.test", ["x@far.test"], MSG)
        assert len(target.received) == 1  # delivered before the 250 came back
        with pytest.raises(smtplib.SMTPDataError) as refused:
            client.sendmail("a@example.test", ["nobody@far.test"], MSG)
        assert refused.value.smtp_code == 550 and b"no such user" in refused.value.smtp_error
        with pytest.raises(smtplib.SMTPDataError) as deferred:
            client.sendmail("a@example.test", ["later@far.test"], MSG)
        assert deferred.value.smtp_code == 451
    # the client owns the retry of what was refused: nothing stays queued, no bounce was sent
    assert list(relay.spool.directory.iterdir()) == []
    assert len(target.received) == 1


def test_as_proxy_and_client_interface_from_the_command_line(relay_process, sink):
    """`relay --as-proxy HOST:PORT` forwards when the client disconnects; --client-interface picks
    the address the relay connects from (the sink sees it as the peer)."""
    target = sink()
    seen: list[str] = []
    original = target.handler.handle_DATA

    async def record_peer(server, session, envelope):
        seen.append(session.peer[0])
        return await original(server, session, envelope)

    target.handler.handle_DATA = record_peer
    relay = relay_process("--as-proxy", f"127.0.0.1:{target.port}", "--client-interface", "127.0.0.2",
                          "--no-daemon")
    client = smtplib.SMTP("127.0.0.1", relay.port)
    client.sendmail("a@example.test", ["x@far.test"], MSG)
    time.sleep(0.5)
    assert target.received == []  # still connected
    client.quit()
    target.wait_for(1)
    assert seen == ["127.0.0.2"]
