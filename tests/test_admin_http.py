"""The admin server over real HTTP and HTTPS (cheroot), and the `relay` process with --admin:
mail sent over SMTP, seen, retried and delivered through the API; tokens from `relay token`;
--admin-terminate; --interface admin=ADDR."""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time

import pytest
import trustme
from admin_support import MESSAGE, SECRETS, Http, basic, start_admin
from conftest import free_port, require, submit, wait_for_port, wait_until
from sinks import Behaviour


@pytest.fixture
def admin(inprocess_relay, tmp_path):
    return start_admin(inprocess_relay, tmp_path)


@pytest.mark.parametrize("path", [
    "/api/v1/queue/../../etc/passwd", "/api/v1/queue/..%2F..%2Fetc%2Fpasswd", "/api/v1/queue/%2e%2e/raw",
    "/api/v1/queue/%2e%2e%2f%2e%2e%2fetc%2fpasswd/raw", "/api/v1/queue/..%5C..%5Cetc%5Cpasswd/raw",
    "/api/v1/queue/%00/raw",
])
def test_a_path_is_never_taken_for_a_message_id(admin, path):
    reply = admin.http().get(path)
    assert reply.status == 404, (path, reply.body)
    assert reply.json()["error"] == "not_found" and b"root:" not in reply.body


def test_https_serves_with_the_configured_certificate(inprocess_relay, tmp_path):
    ca = trustme.CA()
    pem = tmp_path / "admin.pem"
    cert = ca.issue_cert("localhost", "127.0.0.1", common_name="localhost")
    pem.write_bytes(cert.private_key_pem.bytes() + b"".join(c.bytes() for c in cert.cert_chain_pems))
    admin = start_admin(inprocess_relay, tmp_path, admin={"tls_certificate": str(pem)})
    assert admin.url.startswith("https://127.0.0.1:")
    context = ssl.create_default_context()
    ca.configure_trust(context)
    client = admin.http(context=context)
    assert client.get("/api/v1/stats").json()["counters"]["received"] == 0
    # A client that connects and never says hello must not hold up anybody else.
    silent = socket.create_connection((client.host, client.port))
    try:
        started = time.monotonic()
        assert client.get("/healthz").status == 200
        assert time.monotonic() - started < 2
        # Nor does one that speaks plain HTTP to the HTTPS port break the server.
        try:
            status: int | None = Http(admin.url.replace("https", "http")).get("/healthz").status
        except (OSError, http.client.HTTPException):
            status = None
        assert status != 200
        assert client.get("/healthz").status == 200
    finally:
        silent.close()
    login_page = client.get("/login", auth=False)
    assert "Secure" in login_page.headers["Set-Cookie"]


def test_the_event_stream_sends_events_as_they_happen_and_ends_when_the_relay_stops(admin):
    client = admin.http()
    conn = client.connection(timeout=20)
    conn.request("GET", "/api/v1/events/stream", headers={"Authorization": basic()})
    response = conn.getresponse()
    assert response.status == 200 and response.headers["Content-Type"].startswith("text/event-stream")
    assert response.readline() == b"retry: 3000\n"
    submit(admin.running.port, MESSAGE, recipients=["b@example.test"])
    lines: list[bytes] = []
    while b"event: received\n" not in lines:
        lines.append(response.readline())
    seq = int(lines[lines.index(b"event: received\n") - 1].split(b":")[1])
    data = json.loads(response.readline().split(b":", 1)[1])
    assert data["name"] == "received" and data["seq"] == seq and data["data"]["recipients"] == ["b@example.test"]
    # A reconnecting client names the last event it saw and gets only what came after.
    resumed = client.connection(timeout=20)
    resumed.request("GET", "/api/v1/events/stream", headers={"Authorization": basic(), "Last-Event-ID": str(seq)})
    follow = resumed.getresponse()
    assert follow.readline() == b"retry: 3000\n" and follow.readline() == b"\n"
    stopper = threading.Thread(target=admin.running.stop)
    started = time.monotonic()
    stopper.start()
    response.read()  # returns at the end of the stream
    assert time.monotonic() - started < 10
    stopper.join(30)
    assert b"event: received" not in follow.read()
    conn.close()
    resumed.close()


def test_too_many_streams_are_refused(inprocess_relay, tmp_path):
    admin = start_admin(inprocess_relay, tmp_path, admin={"max_streams": 1, "threads": 4})
    client = admin.http()
    first = client.connection()
    first.request("GET", "/api/v1/events/stream", headers={"Authorization": basic()})
    assert first.getresponse().status == 200
    second = client.get("/api/v1/events/stream")
    assert second.status == 503 and second.json()["error"] == "too_many_streams"
    first.close()


# ---------------------------------------------------------------- the relay process
def relay(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mailrelay", *args], capture_output=True, text=True,
                          timeout=60, **kw)


def test_mail_is_seen_retried_and_delivered_through_the_api(relay_process, sink, tmp_path):
    behaviour = Behaviour(refuse={"b@": "451 4.3.0 Try again later"})
    next_hop = sink(behaviour)
    (tmp_path / "admin.secrets").write_text(SECRETS)
    conf = tmp_path / "relay.conf"
    conf.write_text(f'[admin]\nauth = "{tmp_path / "admin.secrets"}"\n')
    port = free_port()
    running = relay_process("-c", str(conf), "--admin", str(port), "--forward-to", f"127.0.0.1:{next_hop.port}")
    wait_for_port(port, running.proc)  # the SMTP socket is bound before start-up, the admin one during it
    api = Http(f"http://127.0.0.1:{port}")
    assert submit(running.port, MESSAGE, recipients=["b@example.test"]) == (250, "")
    deferred = wait_until(lambda: api.get("/api/v1/queue?state=deferred").json()["messages"], what="a deferral")
    message_id = deferred[0]["id"]
    details = api.get(f"/api/v1/queue/{message_id}").json()
    assert details["attempts"][0]["outcome"] == "temp" and "451 4.3.0 Try again later" in details["last_error"]
    behaviour.refuse.clear()
    assert api.post(f"/api/v1/queue/{message_id}/retry").json() == {"id": message_id, "was": "deferred",
                                                                    "changed": True}
    next_hop.wait_for(1)
    wait_until(lambda: api.get("/api/v1/queue").json()["total"] == 0, what="the queue to empty")
    delivered = api.get("/api/v1/events?name=message.delivered").json()["events"]
    assert [(e["message_id"], e["data"]["recipient"]) for e in delivered] == [(message_id, "b@example.test")]
    stats = api.get("/api/v1/stats").json()["counters"]
    assert (stats["received"], stats["message.deferred"], stats["message.delivered"]) == (1, 1, 1)
    assert f"admin: serving on http://127.0.0.1:{port}" in running.log


def test_relay_token_commands_manage_the_tokens_the_daemon_accepts(relay_process, tmp_path):
    spool = tmp_path / "spool"
    port = free_port()
    wait_for_port(port, relay_process("--admin", str(port), spool=spool).proc)
    created = relay("token", "create", "deploy-bot", "--spool-dir", str(spool))
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert token.startswith("mrt_") and "shown only now" in created.stderr
    assert token not in (spool / "admin-tokens.json").read_text()
    listed = relay("token", "list", "--spool-dir", str(spool), "--json")
    assert [t["name"] for t in json.loads(listed.stdout)] == ["deploy-bot"]
    api = Http(f"http://127.0.0.1:{port}", auth=f"Bearer {token}")
    assert api.get("/api/v1/queue").status == 200
    twice = relay("token", "create", "deploy-bot", "--spool-dir", str(spool))
    assert twice.returncode == 1 and "exists already" in twice.stderr
    assert relay("token", "revoke", "deploy-bot", "--spool-dir", str(spool)).returncode == 0
    assert api.get("/api/v1/queue").status == 401
    assert "no tokens" in relay("token", "list", "--spool-dir", str(spool)).stdout


def test_admin_terminate_stops_the_relay_only_when_enabled(relay_process, tmp_path):
    (tmp_path / "admin.secrets").write_text(SECRETS)
    conf = tmp_path / "relay.conf"
    conf.write_text(f'[admin]\nauth = "{tmp_path / "admin.secrets"}"\n')
    port = free_port()
    plain = relay_process("-c", str(conf), "--admin", str(port))
    wait_for_port(port, plain.proc)
    refused = Http(f"http://127.0.0.1:{port}").post("/api/v1/terminate")
    assert refused.status == 403 and "--admin-terminate" in refused.json()["detail"]
    assert plain.proc.poll() is None
    plain.stop()
    port = free_port()
    running = relay_process("-c", str(conf), "-a", str(port), "-Q")
    wait_for_port(port, running.proc)
    reply = Http(f"http://127.0.0.1:{port}").post("/api/v1/terminate")
    assert reply.status == 202 and reply.json() == {"terminating": True}
    assert running.proc.wait(20) == 0
    assert "asked the relay to terminate" in running.log


def test_interface_admin_prefix_chooses_the_admin_address(relay_process):
    port = free_port()
    running = relay_process("--admin", str(port), "--interface", "smtp=127.0.0.1,admin=127.0.0.2")
    wait_for_port(port, running.proc, host="127.0.0.2")
    assert Http(f"http://127.0.0.2:{port}").get("/healthz").status == 200
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), 2).close()


def test_a_bad_admin_section_is_a_configuration_error(tmp_path):
    conf = tmp_path / "relay.conf"
    conf.write_text('[admin]\nlisten = ["somewhere:80"]\n')
    result = relay("check-config", str(conf))
    assert result.returncode == 1
    assert "[admin] listen: 'somewhere:80': 'somewhere' is not an IP address" in result.stderr
    conf.write_text('[admin]\nthreads = 1\n')
    assert "[admin] threads: must be 2 to 256" in relay("check-config", str(conf)).stderr


def test_the_daemon_edits_the_file_it_was_started_with(tmp_path):
    # Started with a relative -c path: the daemon keeps the absolute one.
    (tmp_path / "admin.secrets").write_text(SECRETS)
    conf = tmp_path / "relay.conf"
    conf.write_text('[admin]\nauth = "admin.secrets"\n')
    port = free_port()
    running = subprocess.Popen([sys.executable, "-m", "mailrelay", "-c", "relay.conf", "--no-daemon", "--admin",
                                str(port), "--port", str(free_port()), "--spool-dir", "spool"], cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, running)
        api = Http(f"http://127.0.0.1:{port}")
        current = api.get("/api/v1/config").json()
        assert current["file"] == str(conf) and current["text"] == conf.read_text()
        new = current["text"] + "\n[log]\nenabled = true\n"
        saved = api.request("PUT", "/api/v1/config", new.encode(), {"Content-Type": "text/plain",
                                                                   "If-Match": current["etag"]}).json()
        assert saved["saved"] and saved["changed"] == ["log.enabled"]
        assert conf.read_text() == new
    finally:
        running.terminate()
        running.wait(20)


def test_a_socket_from_systemd_socket_activation_serves_the_admin_api(tmp_path):
    tool = require("systemd-socket-activate")
    smtp_port, admin_port, configured_port = free_port(), free_port(), free_port()
    (tmp_path / "admin.secrets").write_text(SECRETS)
    log = tmp_path / "activate.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([tool, "-l", f"127.0.0.1:{smtp_port}", "-l", f"127.0.0.1:{admin_port}",
                                 "--fdname=smtp:admin", sys.executable, "-m", "mailrelay", "--no-daemon", "--log",
                                 "--no-syslog", "--spool-dir", str(tmp_path / "spool"), "--admin", str(configured_port)],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, "MAILRELAY_CONFIG": ""})
    try:
        wait_until(lambda: log.read_text().count("Listening on") == 2, what="systemd-socket-activate")
        # This first request starts the relay; it is answered once the admin server serves the socket.
        assert Http(f"http://127.0.0.1:{admin_port}", auth=None).get("/healthz").status == 200
        assert f"admin: serving on http://127.0.0.1:{admin_port}" in log.read_text()
        with pytest.raises(ConnectionRefusedError):  # the configured port gives way to the passed socket
            socket.create_connection(("127.0.0.1", configured_port), 5).close()
    finally:
        proc.terminate()
        proc.wait(30)


class UnixHttp(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=15)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)


def test_the_admin_server_listens_on_a_unix_socket_whose_clients_are_local(inprocess_relay, tmp_path):
    path = tmp_path / "admin.sock"
    admin = start_admin(inprocess_relay, tmp_path, admin={"listen": ["8025"]},  # a port alone: where --interface says
                        config={"smtp": {"interface": ["smtp=127.0.0.1", f"admin={path}"]}})
    assert admin.plugin.listener.urls == [f"http+unix://{path}"]
    assert oct(path.stat().st_mode & 0o777) == "0o660"
    conn = UnixHttp(str(path))
    conn.request("GET", "/api/v1/stats", headers={"Authorization": basic()})  # no TLS needed: local
    response = conn.getresponse()
    assert response.status == 200 and json.loads(response.read())["counters"]["received"] == 0
    conn.close()
    admin.running.stop()
    assert not path.exists()
