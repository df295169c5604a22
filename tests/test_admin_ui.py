"""The admin UI's pages through Flask's test client: logging in, the session cookie, CSRF on every
form, escaping of everything that comes from mail, the queue actions and the config editor.
(The real browser drives it in test_admin_browser.py.)"""

from __future__ import annotations

import html
import re
import smtplib
from pathlib import Path

import pytest
from markupsafe import escape
from admin_support import PASSWORD, USER, basic, csrf_of, login, start_admin

EVIL_SUBJECT = "<script>window.pwned=1</script>"
EVIL_FROM = '"Mallory \\"<img src=x onerror=alert(1)>\\"" <mallory@example.test>'
EVIL_SENDER = '"x\\"onmouseover=alert(1)"@example.test'  # a quoted local part, as RFC 5321 allows


@pytest.fixture
def admin(inprocess_relay, tmp_path):
    return start_admin(inprocess_relay, tmp_path)


@pytest.fixture
def browser(admin):
    client = admin.client()
    response = login(client)
    assert response.status_code == 303, response.data
    return client


def send(admin, content: bytes, sender: str = "a@example.test") -> str:
    with smtplib.SMTP("127.0.0.1", admin.running.port, timeout=15) as client:
        client.sendmail(sender, ["b@example.test"], content)
    return sorted(p.name[: -len(".content")] for p in admin.relay.spool.directory.glob("*.content"))[-1]


def test_login_sets_a_strict_httponly_session_cookie_and_logout_ends_it(admin):
    client = admin.client(HTTP_ACCEPT="text/html")
    assert client.get("/queue").headers["Location"] == "/login?next=/queue"
    response = login(client)
    assert response.headers["Location"] == "/"
    cookie = response.headers.getlist("Set-Cookie")
    session = next(c for c in cookie if c.startswith("relay_session="))
    assert "HttpOnly" in session and "SameSite=Strict" in session and "Path=/" in session
    page = client.get("/")
    assert page.status_code == 200 and f">{USER}<" in page.get_data(as_text=True)
    logout = client.post("/logout", data={"csrf_token": csrf_of(page.get_data(as_text=True))})
    assert logout.status_code == 303
    assert client.get("/").status_code == 302  # the session is gone on the server, not only in the browser


def test_a_wrong_password_shows_the_form_again(admin):
    client = admin.client()
    response = login(client, password="wrong")
    assert response.status_code == 401 and b"Wrong user name or password." in response.data
    assert not any(c.startswith("relay_session=") for c in response.headers.getlist("Set-Cookie"))


def test_the_login_form_has_its_own_csrf_token(admin):
    client = admin.client()
    client.get("/login")
    forged = client.post("/login", data={"csrf_token": "forged", "username": USER, "password": PASSWORD})
    assert forged.status_code == 403 and b"The form expired" in forged.data


def test_login_only_redirects_to_this_site(admin):
    client = admin.client()
    page = client.get("/login?next=//evil.example/x")
    token = csrf_of(page.get_data(as_text=True))
    response = client.post("/login", data={"csrf_token": token, "username": USER, "password": PASSWORD,
                                           "next": "//evil.example/x"})
    assert response.headers["Location"] == "/"


def test_every_form_carries_the_csrf_token_and_posts_without_it_are_refused(admin, browser):
    message_id = send(admin, b"Subject: x\r\n\r\nbody\r\n")
    for path in ("/", "/queue", f"/queue/{message_id}", "/plugins"):
        page = browser.get(path).get_data(as_text=True)
        forms = re.findall(r"<form [^>]*method=\"post\".*?</form>", page, re.S)
        assert forms, path
        for form in forms:
            assert 'name="csrf_token" value="' in form, (path, form[:120])
    refused = browser.post(f"/queue/{message_id}/delete", data={})
    assert refused.status_code == 403 and refused.get_json()["error"] == "csrf"
    wrong = browser.post(f"/queue/{message_id}/delete", data={"csrf_token": "x" * 43})
    assert wrong.status_code == 403
    api = browser.delete(f"/api/v1/queue/{message_id}")  # the API with the cookie: the header is needed
    assert api.status_code == 403
    token = csrf_of(browser.get("/queue").get_data(as_text=True))
    assert browser.delete(f"/api/v1/queue/{message_id}", headers={"X-CSRF-Token": token}).status_code == 200


def test_subjects_and_addresses_are_escaped_everywhere(admin, browser):
    content = (f"From: {EVIL_FROM}\r\nSubject: {EVIL_SUBJECT}\r\n\r\n<script>body()</script>\r\n").encode()
    message_id = send(admin, content, sender=EVIL_SENDER)
    for path in ("/queue", f"/queue/{message_id}", "/"):
        page = browser.get(path).get_data(as_text=True)
        assert "<script>window" not in page and "<img" not in page and "<script>body" not in page, path
        assert 'onmouseover=alert(1)"' not in page, path
        scripts = re.findall(r"<script[^>]*>", page)
        assert scripts == ['<script src="/static/app.js" defer>'], (path, scripts)
    listing = browser.get("/queue").get_data(as_text=True)
    assert str(escape(EVIL_SUBJECT)) in listing and str(escape(EVIL_SENDER)) in listing  # shown, as text
    shown = browser.get(f"/queue/{message_id}").get_data(as_text=True)
    assert str(escape(EVIL_SUBJECT)) in shown and str(escape(EVIL_SENDER)) in shown
    assert str(escape(EVIL_FROM)) in shown  # the headers
    assert "&lt;script&gt;body()&lt;/script&gt;" in shown  # the raw message, as text


def test_queue_actions_from_the_ui(admin, browser):
    first = send(admin, b"Subject: one\r\n\r\nbody\r\n")
    second = send(admin, b"Subject: two\r\n\r\nbody\r\n")
    token = csrf_of(browser.get("/queue").get_data(as_text=True))
    retried = browser.post(f"/queue/{first}/retry", data={"csrf_token": token, "back": f"/queue/{first}"})
    assert retried.headers["Location"] == f"/queue/{first}?acted=1"
    assert f"{first}: due now" in browser.get(f"/queue/{first}?acted=1").get_data(as_text=True)
    bounced = browser.post(f"/queue/{first}/bounce", data={"csrf_token": token})
    assert bounced.status_code == 303
    page = browser.get("/queue?state=bad").get_data(as_text=True)
    assert "returned to the sender" in page and first in page and second not in page
    deleted = browser.post(f"/queue/{second}/delete", data={"csrf_token": token, "back": f"/queue/{second}"})
    assert not (admin.relay.spool.directory / f"{second}.content").exists()
    # Its own page, where the operator came from, now sends them to the queue list, not to a 404.
    gone = browser.get(deleted.headers["Location"])
    assert gone.status_code == 303 and gone.headers["Location"] == "/queue"
    assert "is no longer in the queue" in browser.get("/queue").get_data(as_text=True)
    missing = browser.get(f"/queue/{second}")
    assert missing.status_code == 404 and b"No such message" in missing.data
    bad_search = browser.get("/queue?min_age=whenever").get_data(as_text=True)
    assert "min_age: &#39;whenever&#39; is not a duration" in bad_search


def test_the_dashboard_shows_counters_and_recent_events(admin, browser):
    message_id = send(admin, b"Subject: hi\r\n\r\nbody\r\n")
    page = browser.get("/").get_data(as_text=True)
    assert 'data-counter="received">1<' in page
    assert f'data-message-id="{message_id}"' in page and "from &lt;a@example.test&gt; to b@example.test" in page
    assert re.search(r'data-gauge="total">1<', page)


def test_the_config_editor_shows_errors_in_place_and_saves_a_valid_file(admin, browser, tmp_path: Path):
    conf = tmp_path / "relay.conf"
    conf.write_text('[smtp]\nport = 2525\n\n[log]\nenabled = true\n')
    admin.relay.settings.config_file = str(conf)
    page = browser.get("/config").get_data(as_text=True)
    assert "port = 2525" in page and str(conf) in page
    token, etag = csrf_of(page), html.unescape(re.search(r'name="etag" value="([^"]+)"', page).group(1))
    broken = '[smtp]\nport = "lots"\n\n[log]\nenabled = true\n'
    response = browser.post("/config", data={"csrf_token": token, "etag": etag, "text": broken, "action": "save"})
    assert response.status_code == 422
    shown = response.get_data(as_text=True)
    assert f"{conf}:2: [smtp] port: expected an integer" in shown
    assert 'line 2: <code>port = &#34;lots&#34;</code>' in shown and 'data-error-line="2"' in shown
    assert "port = &#34;lots&#34;" in shown.split('id="config-text"')[1]  # the edit is kept, not lost
    assert conf.read_text().startswith("[smtp]\nport = 2525")
    checked = browser.post("/config", data={"csrf_token": token, "etag": etag, "action": "check",
                                            "text": "[smtp]\nport = 2600\n"})
    assert "Valid. Would change: log.enabled, smtp.port." in checked.get_data(as_text=True)
    saved = browser.post("/config", data={"csrf_token": token, "etag": etag, "action": "save",
                                          "text": "[smtp]\r\nport = 2600\r\n"})
    assert saved.status_code == 303 and conf.read_text() == "[smtp]\nport = 2600\n"
    assert "Restart the relay to apply the changes." in browser.get("/config").get_data(as_text=True)
    stale = browser.post("/config", data={"csrf_token": token, "etag": etag, "action": "save", "text": "[smtp]\n"})
    assert stale.status_code == 412 and b"changed since it was read" in stale.data


def test_the_plugins_page_lists_enabled_and_installed_plugins(browser):
    page = browser.get("/plugins").get_data(as_text=True)
    assert re.search(r'<tr class="enabled"><td>admin</td><td>enabled</td>', page)
    assert re.search(r'<tr class="disabled"><td>forward</td>', page)


def test_api_pages_work_with_the_session_cookie(admin, browser):
    assert browser.get("/api/v1/stats").status_code == 200
    assert admin.client().get("/api/v1/stats", headers={"Authorization": basic()}).status_code == 200
