"""Webhooks: mail sent over SMTP to a real relay process ends up as signed POSTs to a real HTTP
receiver on loopback, exactly once per event id, through outages and restarts."""

from __future__ import annotations

import json
import re
import socket
import ssl
import subprocess
import sys
import threading
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import trustme

from conftest import ROOT, free_port, submit, wait_until
from sinks import Behaviour

SECRET = "s3cret-for-the-receiver"


def readme_verify():
    """The receiver's check, taken from the README so that the documented snippet is what works."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Webhooks", 1)[1].split("\n## ", 1)[0]
    [code] = [block for block in re.findall(r"```python\n(.*?)```", section, re.S) if "def verify" in block]
    namespace: dict = {}
    exec(code, namespace)
    return namespace["verify"]


class Receiver:
    """A real HTTP(S) server that checks each request with the README's ``verify`` and records it.

    ``answers`` are statuses to give (in order) before accepting; a request with a bad signature
    gets 401 and is counted in ``bad_signatures``.
    """

    def __init__(self, secret: str = SECRET, port: int = 0, tls: ssl.SSLContext | None = None):
        self.secret = secret.encode()
        self.verify = readme_verify()
        self.accepted: list[tuple[str, dict]] = []   # (path, event) per 2xx answer
        self.refused: list[int] = []                 # statuses given from `answers`
        self.answers: list[int] = []
        self.bad_signatures = 0
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                try:
                    event = receiver.verify(receiver.secret, self.headers, body)
                except ValueError:
                    with receiver.lock:
                        receiver.bad_signatures += 1
                    return self._answer(401)
                assert self.headers["X-Relay-Event-Id"] == event["id"]
                assert self.headers["Content-Type"] == "application/json"
                with receiver.lock:
                    if receiver.answers:
                        status = receiver.answers.pop(0)
                        receiver.refused.append(status)
                        return self._answer(status, {"Retry-After": "0"} if status == 429 else {})
                    receiver.accepted.append((self.path, event))
                self._answer(204)

            def _answer(self, status: int, headers: dict | None = None) -> None:
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.scheme = "https" if tls else "http"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, path: str = "/hook") -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    def start(self) -> "Receiver":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def events(self, path: str | None = None) -> list[dict]:
        with self.lock:
            return [e for p, e in self.accepted if path is None or p == path]

    def ids(self, path: str | None = None) -> list[str]:
        return [e["id"] for e in self.events(path)]


class Hanging:
    """An endpoint that accepts connections and never answers."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections: list[socket.socket] = []
        self.requests: list[bytes] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections.append(conn)
            self.requests.append(conn.recv(65536))

    def stop(self) -> None:
        self.sock.close()
        for conn in self.connections:
            conn.close()


def write_config(path: Path, hooks: dict[str, dict]) -> Path:
    lines = []
    for name, options in hooks.items():
        lines.append(f"[webhooks.{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in options.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def start_relay(relay_process, tmp_path, sink_port: int, hooks: dict[str, dict], **kw):
    conf = write_config(tmp_path / "relay.conf", hooks)
    return relay_process("--config", str(conf), "--forward-to", f"127.0.0.1:{sink_port}", **kw)


def outbox(relay) -> list[str]:
    directory = relay.spool / "webhooks"
    return sorted(p.name for p in directory.glob("*.json")) if directory.exists() else []


def mail(n: int, to: str = "x@far.test") -> bytes:
    return f"From: a@example.test\r\nTo: {to}\r\nSubject: hook {n}\r\n\r\nbody {n}\r\n".encode()


def test_each_delivery_is_posted_once_signed_with_its_event_id(relay_process, sink, tmp_path):
    receiver = Receiver().start()
    smarthost = sink()
    relay = start_relay(relay_process, tmp_path, smarthost.port,
                        {"crm": {"url": receiver.url(), "events": ["message.delivered"], "secret": SECRET}})
    for n in range(3):
        assert submit(relay.port, mail(n)) == (250, "")
    smarthost.wait_for(3)
    wait_until(lambda: len(receiver.events()) == 3, what="three delivered events")
    wait_until(lambda: not outbox(relay), what="an empty outbox")  # so nothing more can come

    events = receiver.events()
    assert len(set(receiver.ids())) == 3 and receiver.bad_signatures == 0
    assert {e["event"] for e in events} == {"message.delivered"}
    assert len({e["message_id"] for e in events}) == 3
    for event in events:
        assert event["message_id"].startswith("emailrelay.")
        assert event["relay"] == "relay.test"
        assert event["data"]["recipient"] == "x@far.test" and event["data"]["reply"].startswith("250")
        assert datetime.fromisoformat(event["time"]).tzinfo is not None
    assert "webhook=crm" in relay.log and "delivered status=204" in relay.log
    receiver.stop()


def test_only_the_events_a_webhook_asked_for_are_posted(relay_process, sink, tmp_path):
    receiver = Receiver().start()
    smarthost = sink(Behaviour(refuse={"nobody": "550 5.1.1 no such user"}))
    relay = start_relay(relay_process, tmp_path, smarthost.port, {
        "bounces": {"url": receiver.url("/bounces"), "events": ["message.bounced"], "secret": SECRET},
        "everything": {"url": receiver.url("/all"), "events": ["*"], "secret": SECRET}})
    assert submit(relay.port, mail(1)) == (250, "")
    assert submit(relay.port, mail(2, "nobody@far.test"), recipients=["nobody@far.test"]) == (250, "")

    def seen_by_everything():
        return {"received", "message.delivered", "message.bounced"} <= {e["event"] for e in receiver.events("/all")}
    wait_until(seen_by_everything, what="delivery and bounce events at /all")
    wait_until(lambda: receiver.events("/bounces"), what="the bounce at /bounces")
    [bounce] = receiver.events("/bounces")
    assert bounce["event"] == "message.bounced"
    assert bounce["data"]["recipient"] == "nobody@far.test" and bounce["data"]["error"].startswith("550")
    # The same event went to both hooks under one id.
    assert bounce["id"] in receiver.ids("/all")
    receiver.stop()


def test_events_wait_in_the_outbox_for_a_receiver_that_is_down_across_a_restart(relay_process, sink, tmp_path):
    port = free_port()  # nothing listens here yet
    smarthost = sink()
    hooks = {"crm": {"url": f"http://127.0.0.1:{port}/hook", "events": ["message.delivered"], "secret": SECRET,
                     "retry_initial": "0.2s", "retry_max": "0.5s"}}
    relay = start_relay(relay_process, tmp_path, smarthost.port, hooks)
    for n in range(2):
        assert submit(relay.port, mail(n)) == (250, "")
    smarthost.wait_for(2)
    wait_until(lambda: len(outbox(relay)) == 2, what="two events in the outbox")
    wait_until(lambda: "attempt 1 failed" in relay.log, what="a failed attempt")
    assert relay.stop() == 0
    waiting = outbox(relay)
    assert len(waiting) == 2  # a restart finds them

    receiver = Receiver(port=port)
    receiver.answers = [500, 429]  # it comes up, but is not well at first
    receiver.start()
    restarted = start_relay(relay_process, tmp_path, smarthost.port, hooks, spool=relay.spool)
    wait_until(lambda: len(receiver.events()) == 2, what="both events after the restart")
    wait_until(lambda: not outbox(restarted), what="an empty outbox")
    assert sorted(f"crm.{i}.json" for i in receiver.ids()) == waiting  # same ids, each once
    assert receiver.refused == [500, 429]
    assert "resuming 2 event(s)" in restarted.log and "failed: 500" in restarted.log
    assert len(smarthost.received) == 2  # and no mail went twice
    receiver.stop()


def test_mail_is_accepted_and_forwarded_while_the_endpoint_hangs(relay_process, sink, tmp_path):
    endpoint = Hanging()
    smarthost = sink()
    relay = start_relay(relay_process, tmp_path, smarthost.port, {
        "slow": {"url": f"http://127.0.0.1:{endpoint.port}/", "events": ["received", "message.delivered"],
                 "secret": SECRET, "timeout": 120, "concurrency": 1}})
    assert submit(relay.port, mail(0)) == (250, "")
    wait_until(lambda: endpoint.requests and b"X-Relay-Signature" in endpoint.requests[0],
               what="a POST hanging at the endpoint")
    for n in range(1, 6):
        assert submit(relay.port, mail(n)) == (250, "")  # while that POST is still unanswered
    smarthost.wait_for(6)
    assert len(endpoint.connections) == 1  # the one POST in flight still hangs
    wait_until(lambda: len(outbox(relay)) == 12, what="every event kept for later")
    endpoint.stop()


def test_a_receiver_detects_a_wrong_secret_and_the_relay_gives_up_on_the_event(relay_process, sink, tmp_path):
    receiver = Receiver(secret="what-the-receiver-expects").start()
    smarthost = sink()
    relay = start_relay(relay_process, tmp_path, smarthost.port,
                        {"crm": {"url": receiver.url(), "events": ["message.delivered"], "secret": SECRET}})
    assert submit(relay.port, mail(1)) == (250, "")
    wait_until(lambda: receiver.bad_signatures == 1, what="a request with a bad signature")
    wait_until(lambda: not outbox(relay), what="the event dropped")
    assert receiver.events() == []
    wait_until(lambda: "refused permanently: 401" in relay.log, what="the log line")


def test_an_event_older_than_max_age_is_dropped_with_a_log_line(relay_process, sink, tmp_path):
    smarthost = sink()
    relay = start_relay(relay_process, tmp_path, smarthost.port, {
        "gone": {"url": f"http://127.0.0.1:{free_port()}/", "events": ["received"], "secret": SECRET,
                 "retry_initial": "0.2s", "retry_max": "0.2s", "max_age": "1s"}})
    assert submit(relay.port, mail(1)) == (250, "")
    wait_until(lambda: "dropped: not delivered within max_age 1s" in relay.log, what="the drop")
    assert outbox(relay) == []


def test_https_endpoints_are_verified_against_ca_file(relay_process, sink, tmp_path):
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    receiver = Receiver(tls=server_context).start()
    smarthost = sink()
    relay = start_relay(relay_process, tmp_path, smarthost.port, {
        "trusted": {"url": receiver.url("/trusted"), "events": ["received"], "secret": SECRET,
                    "ca_file": str(ca_file)},
        "untrusted": {"url": receiver.url("/untrusted"), "events": ["received"], "secret": SECRET}})
    assert submit(relay.port, mail(1)) == (250, "")
    wait_until(lambda: receiver.events("/trusted"), what="the event over verified HTTPS")
    wait_until(lambda: re.search(r"webhook=untrusted .*certificate verify failed", relay.log, re.I),
               what="the unverifiable certificate in the log")
    assert receiver.events("/untrusted") == []
    receiver.stop()


def test_bad_webhook_settings_are_configuration_errors(tmp_path):
    cases = {
        "http://hooks.example.net/x": "plain http",
        "ftp://127.0.0.1/x": "expected http",
    }
    for url, problem in cases.items():
        conf = write_config(tmp_path / "relay.conf", {"crm": {"url": url, "secret": SECRET}})
        result = subprocess.run([sys.executable, "-m", "mailrelay", "check-config", str(conf)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 1 and problem in result.stderr, result.stderr
    conf = write_config(tmp_path / "relay.conf", {"crm": {"url": "https://hooks.example.net/x"}})
    result = subprocess.run([sys.executable, "-m", "mailrelay", "check-config", str(conf)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "needs a secret" in result.stderr
    conf = write_config(tmp_path / "relay.conf", {"crm": {"url": "https://h.example/", "secret": SECRET,
                                                          "tiemout": 3}})
    result = subprocess.run([sys.executable, "-m", "mailrelay", "check-config", str(conf)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "relay.conf:4: [webhooks.crm] tiemout: unknown key" in result.stderr
