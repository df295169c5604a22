"""Metrics: a real relay process with the metrics plugin, scraped over HTTP and parsed with
prometheus_client's own parser, counts what happened to the mail sent to it."""

from __future__ import annotations

import smtplib
import subprocess
import sys
import urllib.request

import pytest
from flask import Flask
from prometheus_client.parser import text_string_to_metric_families

from conftest import dnsmasq_serving, free_port, submit, wait_until
from sinks import Behaviour

MESSAGE = b"From: a@example.test\r\nTo: x@far.test\r\nSubject: metrics\r\n\r\nhello\r\n"
LOOPING = b"Received: from a by b; Mon, 1 Jan 2024 00:00:00 +0000\r\n" + MESSAGE


class Samples(dict):
    """Every sample of one scrape, by (name, labels)."""

    @classmethod
    def parse(cls, text: str) -> "Samples":
        samples = cls()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples

    def __call__(self, name: str, **labels: str) -> float:
        return self.get((name, tuple(sorted(labels.items()))), 0.0)


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return Samples.parse(response.read().decode())


def verifier_script(tmp_path):
    """An address verifier (E-MailRelay's contract) that knows no "nobody"."""
    script = tmp_path / "verify"
    script.write_text(f"#!{sys.executable}\nimport sys\n"
                      "if sys.argv[1].startswith('nobody@'):\n    print('no such user')\n    sys.exit(2)\n"
                      "print()\nprint(sys.argv[1])\nsys.exit(1)\n")
    script.chmod(0o755)
    return script


def test_counters_and_gauges_follow_the_mail(relay_process, sink, tmp_path):
    smarthost = sink(Behaviour(refuse={"bounce": "550 5.1.1 no such user", "later": "451 4.3.0 try later"}))
    metrics_port = free_port()
    conf = tmp_path / "relay.conf"
    conf.write_text(f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n[smtp]\nmax_hops = 1\n')
    relay = relay_process("--config", str(conf), "--forward-to", f"127.0.0.1:{smarthost.port}",
                          "--address-verifier", str(verifier_script(tmp_path)), "--filter", "exit:0", wait=False)
    wait_until(lambda: "relay started" in relay.log, what="the relay")
    before = scrape(metrics_port)
    assert before("mailrelay_messages_received_total") == 0
    assert before("mailrelay_queue_messages", state="ready") == 0
    assert before("mailrelay_queue_oldest_message_age_seconds") == 0
    assert before("mailrelay_smtp_connections_total") == 0

    for to in ("x@far.test", "y@far.test", "bounce@far.test", "later@far.test"):
        assert submit(relay.port, MESSAGE, recipients=[to]) == (250, "")
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        submit(relay.port, MESSAGE, recipients=["nobody@far.test"])
    code, text = submit(relay.port, LOOPING)
    assert code == 554 and "mail loop" in text
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as held:
        held.noop()
        assert scrape(metrics_port)("mailrelay_smtp_connections_open") == 1

    # Two deliveries, and the report about bounce@ to the sender; later@ waits for its retry.
    smarthost.wait_for(3)
    after = wait_until(lambda: (s := scrape(metrics_port))("mailrelay_messages_deferred_total", code="451") == 1
                       and s("mailrelay_messages_delivered_total") == 3 and s, what="the outcomes counted")
    assert after("mailrelay_messages_received_total") == 4
    assert after("mailrelay_messages_rejected_total", phase="rcpt", code="550") == 1
    assert after("mailrelay_messages_rejected_total", phase="data", code="554") == 1
    assert after("mailrelay_messages_bounced_total", code="550") == 1
    assert after("mailrelay_delivery_latency_seconds_count") == 3
    assert 0 <= after("mailrelay_delivery_latency_seconds_sum") < 60
    assert after("mailrelay_message_size_bytes_count") == 4
    assert after("mailrelay_filter_results_total", stage="server", filter="exit:0", verdict="ok") == 4
    assert after("mailrelay_filter_duration_seconds_count", stage="server", filter="exit:0") == 4
    assert after("mailrelay_smtp_connections_total") == 7
    wait_until(lambda: scrape(metrics_port)("mailrelay_smtp_connections_open") == 0, what="sessions closed")
    # later@'s message waits in the queue; bounce@'s is kept as failed.
    queue = wait_until(lambda: (s := scrape(metrics_port))("mailrelay_queue_messages", state="ready") == 1 and s,
                       what="the deferred message in the queue")
    assert queue("mailrelay_queue_messages", state="bad") == 1
    assert queue("mailrelay_queue_messages", state="busy") == 0
    assert 0 < queue("mailrelay_queue_oldest_message_age_seconds") < 120


def test_auth_failures_refusals_and_dnsbl_hits_are_counted(relay_process, tmp_path):
    dns_port = free_port()
    records = ["--host-record=1.0.0.127.zen.test,127.0.0.2", "--host-record=probe.test,127.0.0.1"]
    with dnsmasq_serving(tmp_path, dns_port, records, probe="probe.test"):
        secrets = tmp_path / "auth.secrets"
        secrets.write_text("server plain alice right-password\n")
        metrics_port = free_port()
        conf = tmp_path / "relay.conf"
        conf.write_text(f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n[auth]\nfailure_delay = 0\n'
                        f'[dnsbl]\nallow = []\nmode = "tag"\nservers = ["zen.test"]\n'
                        f'dns_server = "127.0.0.1:{dns_port}"\n')
        relay = relay_process("--config", str(conf), "--server-auth", str(secrets), wait=False)
        wait_until(lambda: "relay started" in relay.log, what="the relay")
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as client:
            client.ehlo()
            client.user, client.password = "alice", "wrong"
            with pytest.raises(smtplib.SMTPAuthenticationError):
                client.auth("PLAIN", client.auth_plain)
            with pytest.raises(smtplib.SMTPSenderRefused) as refused:  # no mail without AUTH
                client.sendmail("a@example.test", ["x@far.test"], MESSAGE)
            assert refused.value.smtp_code == 530
        samples = wait_until(lambda: (s := scrape(metrics_port))("mailrelay_dnsbl_hits_total", zone="zen.test")
                             and s, what="the listing counted")
    assert samples("mailrelay_dnsbl_hits_total", zone="zen.test") == 1
    assert samples("mailrelay_auth_failures_total", mechanism="PLAIN") == 1  # once, not per reporter
    assert samples("mailrelay_messages_rejected_total", phase="mail", code="530") == 1


def test_the_admin_blueprint_serves_the_same_registry(inprocess_relay):
    relay = inprocess_relay(enable=["metrics"])
    plugin = relay.host.pm.get_plugin("metrics")
    app = Flask(__name__)
    app.register_blueprint(plugin.relay_admin_blueprint())
    assert submit(relay.port, MESSAGE) == (250, "")
    client = app.test_client()

    def scraped() -> Samples:
        response = client.get("/metrics")
        assert response.status_code == 200 and response.mimetype == "text/plain"
        return Samples.parse(response.get_data(as_text=True))
    samples = wait_until(lambda: (s := scraped())("mailrelay_messages_received_total") == 1 and s,
                         what="the message counted")
    assert samples("mailrelay_queue_messages", state="ready") == 1  # nothing forwards it here


@pytest.mark.parametrize("listen, allow_remote, ok", [
    ("127.0.0.1:9101", False, True), ("9101", False, True), ("[::1]:9101", False, True),
    ("0.0.0.0:9101", False, False), ("192.0.2.1:9101", False, False), ("0.0.0.0:9101", True, True),
    ("127.0.0.1:99999", False, False),
])
def test_the_standalone_exporter_stays_on_loopback_unless_allowed(tmp_path, listen, allow_remote, ok):
    conf = tmp_path / "relay.conf"
    conf.write_text(f'[metrics]\nlisten = "{listen}"\nallow_remote = {str(allow_remote).lower()}\n')
    result = subprocess.run([sys.executable, "-m", "mailrelay", "check-config", str(conf)],
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode == 0) is ok, result.stderr
    if not ok:
        assert "[metrics] listen" in result.stderr
