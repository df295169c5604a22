"""The admin JSON API (/api/v1) on an in-process relay: authentication, the queue, injection,
events, statistics, plugins, configuration. Fine-grained checks use Flask's test client on the
app the plugin serves; test_admin_http.py goes over real HTTP."""

from __future__ import annotations

import base64
import email
import email.policy
import json
import os
import re
import smtplib
import stat

import pytest
from admin_support import MESSAGE, PASSWORD, USER, basic, start_admin

from mailrelay.hookspecs import hookimpl
from mailrelay.spool.envelope import Envelope
from mailrelay.types import Verdict
from mailrelay_plugins.admin.tokens import TokenStore

AUTH = {"Authorization": basic()}


class Policy:
    """Policies the API must not bypass."""

    @hookimpl
    def on_mail_from(self, session, transaction, address):
        if address.startswith("blocked@"):
            return Verdict.deny("Sender blocked", code=550, enhanced="5.7.1")
        if address.startswith("later@"):
            return Verdict.deny_soft("Try again later", code=451, enhanced="4.7.1")
        return None

    @hookimpl
    def on_rcpt_to(self, session, transaction, recipient):
        if recipient.address.startswith("trap@"):
            return Verdict.deny("No such user", code=550, enhanced="5.1.1")
        return None

    @hookimpl
    def on_receive(self, message):
        if b"X-Hold: yes" in message.content:
            return Verdict.quarantine("held for review")
        return None


def send(admin, content=MESSAGE, sender="a@example.test", recipients=("b@example.test",)) -> str:
    with smtplib.SMTP("127.0.0.1", admin.running.port, timeout=15) as client:
        client.sendmail(sender, list(recipients), content)
        reply = client.noop()
    assert reply[0] == 250
    ids = sorted(p.name[: -len(".content")] for p in admin.relay.spool.directory.glob("*.content"))
    return ids[-1]


@pytest.fixture
def admin(inprocess_relay, tmp_path):
    return start_admin(inprocess_relay, tmp_path, plugins={"policy": Policy()})


def sample_url(rule) -> str:
    return re.sub(r"<(?:\w+:)?(\w+)>", lambda m: "emailrelay.1.2.3" if m.group(1) == "message_id" else
                  ("retry" if m.group(1) == "action" else "x.css"), rule.rule)


# ---------------------------------------------------------------- authentication
def test_every_route_but_health_and_login_needs_credentials(admin):
    client = admin.client()
    client.environ_base["HTTP_ACCEPT"] = "text/html,*/*;q=0.8"  # as a browser asks: pages redirect to the login
    checked = 0
    for rule in admin.app.url_map.iter_rules():
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            response = client.open(sample_url(rule), method=method)
            if rule.endpoint in ("healthz", "readyz", "ui.login", "static"):
                assert response.status_code in (200, 403, 404), rule  # x.css: none; a login form without its token: 403
                continue
            checked += 1
            if rule.rule.startswith("/api/"):
                assert response.status_code == 401, (rule.rule, method)
                assert response.get_json()["error"] == "unauthorized"
                assert response.headers["WWW-Authenticate"].startswith("Basic")
            else:
                assert response.status_code in (302, 303), (rule.rule, method)
                assert response.headers["Location"].startswith("/login")
    assert checked >= 20
    assert client.get("/healthz").get_json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.get_json()["checks"] == {"started": True, "spool_writable": True}


def test_readyz_says_what_is_not_ready(admin):
    client = admin.client()
    spool = admin.relay.spool.directory
    os.rename(spool, spool.with_name("moved"))  # root may write anywhere: take the directory away
    try:
        gone = client.get("/readyz")
    finally:
        os.rename(spool.with_name("moved"), spool)
    assert gone.status_code == 503
    assert gone.get_json() == {"status": "not ready", "checks": {"started": True, "spool_writable": False}}
    admin.plugin.started = False  # as between relay_shutdown and the end of the process
    assert client.get("/readyz").get_json()["checks"]["started"] is False


def test_basic_credentials_work_and_wrong_ones_are_refused(admin):
    client = admin.client()
    assert client.get("/api/v1/queue", headers=AUTH).status_code == 200
    wrong = client.get("/api/v1/queue", headers={"Authorization": basic(USER, "nope")})
    assert wrong.status_code == 401 and wrong.get_json() == {"error": "unauthorized",
                                                            "detail": "wrong user name or password"}
    garbled = client.get("/api/v1/queue", headers={"Authorization": "Basic %%%"})
    assert garbled.status_code == 401
    other = client.get("/api/v1/queue", headers={"Authorization": "Digest x"})
    assert other.status_code == 401


def test_credentials_are_refused_over_plain_http_from_a_remote_address(admin):
    remote = admin.client(REMOTE_ADDR="192.0.2.7")
    response = remote.get("/api/v1/queue", headers=AUTH)
    assert response.status_code == 403
    assert response.get_json()["error"] == "insecure_channel"
    page = remote.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.get_data(as_text=True)).group(1)
    form = remote.post("/login", data={"csrf_token": token, "username": USER, "password": PASSWORD})
    assert form.status_code == 403 and b"only over HTTPS" in form.data
    assert remote.get("/api/v1/queue", headers=AUTH, environ_overrides={"wsgi.url_scheme": "https"}).status_code == 200


def test_failed_logins_are_throttled_then_refused(inprocess_relay, tmp_path):
    secrets = tmp_path / "admin.secrets"
    secrets.write_text(f"server plain {USER} {PASSWORD}\n")
    admin = start_admin(inprocess_relay, tmp_path, admin={"auth": ""}, enable=("auth",), config={"auth": {
        "server_auth": str(secrets), "require": False, "failure_delay": 0, "throttle_delay_after": 2,
        "throttle_delay": 0.05, "throttle_max_delay": 0.1, "throttle_disconnect_after": 4}})
    client = admin.client()
    assert client.get("/api/v1/stats", headers=AUTH).status_code == 200  # [auth]'s accounts log in here
    statuses = [client.get("/api/v1/stats", headers={"Authorization": basic(USER, f"guess{i}")}).status_code
                for i in range(6)]
    assert statuses[:4] == [401] * 4 and statuses[4:] == [429, 429]
    locked = client.get("/api/v1/stats", headers={"Authorization": basic(USER, "guess-again")})
    assert locked.headers["Retry-After"] == "900" and locked.get_json()["error"] == "too_many_failures"
    failed = admin.running.call(_failures(admin))
    assert failed and all(e["data"]["mechanism"] == "HTTP" for e in failed)


async def _failures(admin):
    return [e.to_dict() for e in admin.plugin.events.recent(0, 100, {"auth.failed"})]


def test_api_tokens_are_stored_hashed_and_revocable(admin, tmp_path):
    store = TokenStore(admin.relay.spool.directory / "admin-tokens.json")
    token = store.create("ci")
    text = store.path.read_text()
    assert token not in text and json.loads(text)["tokens"][0]["name"] == "ci"
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    client = admin.client()
    bearer = {"Authorization": f"Bearer {token}"}
    assert client.get("/api/v1/queue", headers=bearer).status_code == 200
    store.revoke("ci")
    refused = client.get("/api/v1/queue", headers=bearer)
    assert refused.status_code == 401 and refused.get_json()["detail"] == "unknown or revoked token"
    assert client.get("/api/v1/queue", headers={"Authorization": "Bearer mrt_guess"}).status_code == 401


# ---------------------------------------------------------------- queue
def test_queue_list_filters_and_pages(admin):
    first = send(admin, sender="alice@example.test", recipients=("x@far.test",))
    second = send(admin, sender="bob@example.test", recipients=("y@far.test", "z@near.test"))
    held = send(admin, content=b"X-Hold: yes\r\nSubject: held\r\n\r\nbody\r\n", sender="carol@example.test")
    client = admin.client()

    def ids(query: str) -> list[str]:
        body = client.get(f"/api/v1/queue{query}", headers=AUTH).get_json()
        return [m["id"] for m in body["messages"]]

    assert ids("") == [first, second, held]
    assert ids("?state=ready") == [first, second]
    assert ids("?state=bad") == [held]
    assert ids("?sender=BOB") == [second]
    assert ids("?recipient=near.test") == [second]
    assert ids("?min_age=1h") == [] and ids("?max_age=1h") == [first, second, held]
    page = client.get("/api/v1/queue?limit=2&offset=1", headers=AUTH).get_json()
    assert (page["total"], [m["id"] for m in page["messages"]]) == (3, [second, held])
    row = page["messages"][0]
    assert row["recipients"] == ["y@far.test", "z@near.test"] and row["sender"] == "bob@example.test"
    assert client.get("/api/v1/queue?state=lost", headers=AUTH).get_json()["error"] == "bad_request"
    assert client.get("/api/v1/queue?limit=0", headers=AUTH).status_code == 400
    assert client.get("/api/v1/queue?min_age=soon", headers=AUTH).status_code == 400


def test_show_raw_retry_and_delete_a_message(admin):
    message_id = send(admin)
    client = admin.client()
    details = client.get(f"/api/v1/queue/{message_id}", headers=AUTH).get_json()
    assert details["sender"] == "a@example.test" and details["recipients"][0]["address"] == "b@example.test"
    assert "Subject: hello" in details["headers"] and details["attempts"] == []
    raw = client.get(f"/api/v1/queue/{message_id}/raw", headers=AUTH)
    assert raw.mimetype == "message/rfc822" and raw.data.endswith(b"Subject: hello\r\n\r\nbody\r\n")
    retried = client.post(f"/api/v1/queue/{message_id}/retry", headers=AUTH).get_json()
    assert retried == {"id": message_id, "was": "ready", "changed": False}
    deleted = client.delete(f"/api/v1/queue/{message_id}", headers=AUTH).get_json()
    assert deleted == {"id": message_id, "deleted": True, "was": "ready"}
    assert not list(admin.relay.spool.directory.glob(f"{message_id}.*"))
    gone = client.get(f"/api/v1/queue/{message_id}", headers=AUTH)
    assert gone.status_code == 404 and gone.get_json()["error"] == "not_found"


@pytest.mark.parametrize("bad_id", ["..", "...", ".hidden", "a..b", "emailrelay.1.2.3", "x" * 300])
def test_anything_but_a_spool_id_is_a_404(admin, bad_id):
    client = admin.client()
    for method, path in (("GET", ""), ("GET", "/raw"), ("POST", "/retry"), ("POST", "/bounce"), ("DELETE", "")):
        response = client.open(f"/api/v1/queue/{bad_id}{path}", method=method, headers=AUTH)
        assert response.status_code == 404, (method, path)
        assert response.get_json()["error"] == "not_found"


def test_a_message_being_forwarded_is_left_alone(admin):
    message_id = send(admin)
    spool = admin.relay.spool.directory
    os.rename(spool / f"{message_id}.envelope", spool / f"{message_id}.envelope.busy")  # as the runner does
    client = admin.client()
    for method, path in (("POST", "/retry"), ("DELETE", ""), ("POST", "/bounce")):
        response = client.open(f"/api/v1/queue/{message_id}{path}", method=method, headers=AUTH)
        assert response.status_code == 409 and response.get_json()["error"] == "busy", path
    assert client.get(f"/api/v1/queue/{message_id}", headers=AUTH).get_json()["state"] == "busy"


def test_bounce_sends_a_report_and_keeps_the_message_as_bad(admin):
    message_id = send(admin, sender="sender@example.test")
    client = admin.client()
    result = client.post(f"/api/v1/queue/{message_id}/bounce", headers=AUTH).get_json()
    assert result["sender"] == "sender@example.test" and result["recipients"] == ["b@example.test"]
    report = Envelope.from_bytes((admin.relay.spool.directory / f"{result['report_id']}.envelope").read_bytes())
    assert report.sender == "" and [r.address for r in report.recipients] == ["sender@example.test"]
    assert client.get(f"/api/v1/queue/{message_id}", headers=AUTH).get_json()["state"] == "bad"
    again = client.post(f"/api/v1/queue/{message_id}/bounce", headers=AUTH)
    assert again.status_code == 409 and "already bounced" in again.get_json()["detail"]
    retried = client.post("/api/v1/queue/retry-all", headers=AUTH).get_json()
    assert retried == {"retried": [{"id": message_id, "was": "bad"}], "busy": []}


# ---------------------------------------------------------------- injecting
def test_a_json_message_is_built_and_queued_like_smtp_mail(admin):
    pdf = base64.b64encode(b"%PDF-1.4 fake").decode()
    response = admin.client().post("/api/v1/messages", headers=AUTH, json={
        "from": "App <app@example.test>", "to": ["a@example.test"], "cc": "c@example.test",
        "bcc": ["hidden@example.test"], "subject": "Grüße <b>", "text": "plain", "html": "<p>html</p>",
        "headers": {"X-Campaign": "42"},
        "attachments": [{"filename": "a.pdf", "content_type": "application/pdf", "content": pdf}]})
    assert response.status_code == 202, response.data
    message_id = response.get_json()["id"]
    assert response.headers["Location"] == f"/api/v1/queue/{message_id}"
    spool = admin.relay.spool.directory
    envelope = Envelope.from_bytes((spool / f"{message_id}.envelope").read_bytes())
    assert envelope.sender == "app@example.test" and envelope.authentication == USER
    assert [r.address for r in envelope.recipients] == ["a@example.test", "c@example.test", "hidden@example.test"]
    content = (spool / f"{message_id}.content").read_bytes()
    assert content.startswith(b"Received: ") and b"\r\n" in content and b"\n" not in content.replace(b"\r\n", b"")
    parsed = email.message_from_bytes(content, policy=email.policy.default)
    assert parsed["Subject"] == "Grüße <b>" and parsed["X-Campaign"] == "42" and parsed["Bcc"] is None
    assert parsed["Message-ID"].endswith("@relay.test>") and parsed["Date"]
    assert parsed.get_body(("plain",)).get_content().strip() == "plain"
    assert parsed.get_body(("html",)).get_content().strip() == "<p>html</p>"
    [attachment] = list(parsed.iter_attachments())
    assert attachment.get_filename() == "a.pdf" and attachment.get_content() == b"%PDF-1.4 fake"


def test_a_raw_message_is_queued_with_its_envelope_from_the_query(admin):
    client = admin.client()
    response = client.post("/api/v1/messages?from=app@example.test&to=a@example.test,b@example.test&to=c@example.test",
                           headers={**AUTH, "Content-Type": "message/rfc822"}, data=MESSAGE.replace(b"\r\n", b"\n"))
    assert response.status_code == 202
    message_id = response.get_json()["id"]
    envelope = Envelope.from_bytes((admin.relay.spool.directory / f"{message_id}.envelope").read_bytes())
    assert [r.address for r in envelope.recipients] == ["a@example.test", "b@example.test", "c@example.test"]
    assert (admin.relay.spool.directory / f"{message_id}.content").read_bytes().endswith(b"\r\n\r\nbody\r\n")


@pytest.mark.parametrize("body, status, error, detail", [
    ({"from": "blocked@example.test", "to": "a@example.test"}, 422, "refused", "550 5.7.1 Sender blocked"),
    ({"from": "app@example.test", "to": "trap@example.test"}, 422, "refused", "550 5.1.1 No such user"),
    ({"from": "later@example.test", "to": "a@example.test"}, 503, "temporarily_refused", "451 4.7.1 Try again later"),
    ({"from": "app@example.test", "to": "a@example.test", "text": "x" * 60000}, 413, "too_large", "552 5.3.4"),
    ({"from": "app@example.test"}, 400, "bad_request", "to: give at least one recipient"),
    ({"from": "app@example.test", "to": "a@example.test", "headers": {"X-A": "1\r\nBcc: e@example.test"}},
     400, "bad_request", "cannot build the message: Header values may not contain linefeed"),
    ({"from": "app@example.test", "to": "a@example.test", "subject": "a\nb"}, 400, "bad_request", "cannot build"),
    ({"from": "app@example.test", "to": "not an address"}, 400, "bad_request", "to: "),
    ({"from": "app@example.test", "to": "a@example.test", "headers": {"Content-Type": "text/html"}},
     400, "bad_request", "headers: 'Content-Type' cannot be set here"),
    ({"from": "app@example.test", "to": "a@example.test", "attachments": [{"content": "%%%"}]},
     400, "bad_request", "attachments[0]: content is not base64"),
    ({"from": "app@example.test", "to": "a@example.test", "priority": 1}, 400, "bad_request", "unknown field"),
])
def test_refused_and_malformed_messages_get_json_errors(inprocess_relay, tmp_path, body, status, error, detail):
    admin = start_admin(inprocess_relay, tmp_path, plugins={"policy": Policy()}, config={"smtp": {"size": 50000}})
    response = admin.client().post("/api/v1/messages", headers=AUTH, json=body)
    assert response.status_code == status, response.data
    answer = response.get_json()
    assert answer["error"] == error and answer["detail"].startswith(detail), answer
    if status == 503:
        assert response.headers["Retry-After"] == "60"
    if detail.startswith("550 5.1.1"):
        assert answer["refused"] == [{"recipient": "trap@example.test", "reply": "550 5.1.1 No such user"}]
    assert not list(admin.relay.spool.directory.glob("*.envelope"))


def test_inject_refuses_other_media_types_and_bad_json(admin):
    client = admin.client()
    assert client.post("/api/v1/messages", headers=AUTH, data="x", content_type="text/plain").status_code == 415
    bad = client.post("/api/v1/messages", headers=AUTH, data="{", content_type="application/json")
    assert bad.status_code == 400 and bad.get_json()["detail"] == "the body is not JSON"
    no_from = client.post("/api/v1/messages?to=a@example.test", headers=AUTH, data=MESSAGE,
                          content_type="message/rfc822")
    assert no_from.status_code == 400


# ---------------------------------------------------------------- observing
def test_stats_count_events_and_measure_the_queue(admin):
    send(admin)
    send(admin, content=b"X-Hold: yes\r\n\r\nbody\r\n")
    client = admin.client()
    stats = client.get("/api/v1/stats", headers=AUTH).get_json()
    assert stats["counters"]["received"] == 1 and stats["counters"]["quarantined"] == 1
    assert stats["counters"]["message.delivered"] == 0
    assert {k: stats["queue"][k] for k in ("ready", "deferred", "busy", "bad", "total")} == {
        "ready": 1, "deferred": 0, "busy": 0, "bad": 1, "total": 2}
    assert stats["queue"]["oldest_age"] >= 0 and stats["uptime"] >= 0
    events = client.get("/api/v1/events?name=received,quarantined", headers=AUTH).get_json()
    assert [e["name"] for e in events["events"]] == ["received", "quarantined"]
    after = client.get(f"/api/v1/events?since={events['events'][0]['seq']}&name=received,quarantined",
                       headers=AUTH).get_json()
    assert [e["name"] for e in after["events"]] == ["quarantined"]
    assert client.get("/api/v1/events?since=-1", headers=AUTH).status_code == 400


def test_plugins_are_listed_with_their_hooks(admin):
    rows = {r["name"]: r for r in admin.client().get("/api/v1/plugins", headers=AUTH).get_json()}
    assert rows["admin"]["enabled"] and "on_event" in rows["admin"]["hooks"]
    assert rows["policy"]["enabled"] and rows["forward"]["enabled"] is False


def test_the_openapi_document_describes_exactly_the_routes(admin):
    client = admin.client()
    document = client.get("/api/v1/openapi.json", headers=AUTH).get_json()
    described = {(f"/api/v1{path}", method.upper()) for path, item in document["paths"].items() for method in item}
    served = {(re.sub(r"<(?:\w+:)?\w+>", "{id}", rule.rule), method)
              for rule in admin.app.url_map.iter_rules() if rule.rule.startswith("/api/v1")
              for method in rule.methods - {"HEAD", "OPTIONS"}}
    assert described == served
    for path, item in document["paths"].items():
        for method, operation in item.items():
            assert "401" in operation["responses"] and operation["summary"], (path, method)


def test_unknown_api_routes_and_methods_answer_json(admin):
    client = admin.client()
    missing = client.get("/api/v1/nothing", headers=AUTH)
    assert missing.status_code == 404 and missing.get_json()["error"] == "not_found"
    wrong = client.put("/api/v1/stats", headers=AUTH)
    assert wrong.status_code == 405 and wrong.get_json()["error"] == "method_not_allowed"
    assert "GET" in wrong.headers["Allow"]


def test_every_response_carries_the_security_headers(admin):
    client = admin.client()
    for response in (client.get("/login"), client.get("/api/v1/stats", headers=AUTH), client.get("/healthz"),
                     client.get("/api/v1/nothing")):
        assert "script-src 'self'" in response.headers["Content-Security-Policy"]
        assert "unsafe-inline" not in response.headers["Content-Security-Policy"]
        assert response.headers["X-Frame-Options"] == "DENY"
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Referrer-Policy"] == "same-origin"


def test_cross_site_writes_are_refused_even_with_credentials(admin):
    message_id = send(admin)
    client = admin.client()
    for headers in ({"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"},
                    {"Sec-Fetch-Site": "same-site"}, {"Origin": "null"}):
        response = client.delete(f"/api/v1/queue/{message_id}", headers={**AUTH, **headers})
        assert response.status_code == 403 and response.get_json()["error"] == "cross_origin", headers
    same = client.post(f"/api/v1/queue/{message_id}/retry", headers={**AUTH, "Origin": "http://localhost",
                                                                     "Sec-Fetch-Site": "same-origin"})
    assert same.status_code == 200


# ---------------------------------------------------------------- other plugins' blueprints
class MetricsLike:
    """A plugin that contributes a page to the admin server."""

    @hookimpl
    def relay_admin_blueprint(self, relay):
        import flask
        blueprint = flask.Blueprint("demo", __name__)
        blueprint.add_url_rule("/demo", "demo", lambda: "demo page for " + relay.domain)
        return blueprint


def test_blueprints_of_other_plugins_are_mounted_behind_the_same_login(inprocess_relay, tmp_path):
    admin = start_admin(inprocess_relay, tmp_path, plugins={"demo": MetricsLike()})
    client = admin.client()
    assert client.get("/demo").status_code == 401  # a scraper or a script
    assert client.get("/demo", headers={"Accept": "text/html"}).status_code == 302  # a browser: the login form
    page = client.get("/demo", headers=AUTH)
    assert page.status_code == 200 and page.data == b"demo page for relay.test"
    assert page.headers["X-Frame-Options"] == "DENY"


# ---------------------------------------------------------------- configuration
def test_config_is_read_validated_and_saved_with_a_backup(admin, tmp_path):
    client = admin.client()
    assert client.get("/api/v1/config", headers=AUTH).get_json()["error"] == "no_config_file"
    conf = tmp_path / "relay.conf"
    conf.write_text("[smtp]\nport = 2525\n")
    conf.chmod(0o640)
    admin.relay.settings.config_file = str(conf)
    current = client.get("/api/v1/config", headers=AUTH)
    assert current.get_json()["text"] == "[smtp]\nport = 2525\n" and current.headers["ETag"]
    invalid = client.put("/api/v1/config", headers=AUTH, data="[smtp]\nport = 2525\nbogus = 1\n",
                         content_type="text/plain")
    assert invalid.status_code == 422 and invalid.get_json()["detail"].startswith(f"{conf}:3: [smtp] bogus: unknown key")
    plugin = client.put("/api/v1/config", headers=AUTH, json={"text": '[plugins]\nenable = ["nosuch"]\n'})
    assert plugin.status_code == 422 and "unknown plugin 'nosuch'" in plugin.get_json()["detail"]
    dry = client.put("/api/v1/config?dry_run=1", headers=AUTH, data="[smtp]\nport = 2600\n").get_json()
    assert dry == {"valid": True, "saved": False, "file": str(conf), "warnings": [], "changed": ["smtp.port"],
                   "restart_required": True, "reloaded": []}
    assert conf.read_text() == "[smtp]\nport = 2525\n"
    stale = client.put("/api/v1/config", headers={**AUTH, "If-Match": '"0000"'}, data="[smtp]\nport = 2600\n")
    assert stale.status_code == 412
    saved = client.put("/api/v1/config", headers={**AUTH, "If-Match": current.headers["ETag"]},
                       data="[smtp]\nport = 2600\n").get_json()
    assert saved["saved"] and saved["changed"] == ["smtp.port"] and saved["restart_required"]
    assert "restart it" in saved["detail"]
    assert conf.read_text() == "[smtp]\nport = 2600\n"
    assert (tmp_path / "relay.conf.bak").read_text() == "[smtp]\nport = 2525\n"
    assert stat.S_IMODE(conf.stat().st_mode) == 0o640
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".relay.conf")]  # no scratch files left
