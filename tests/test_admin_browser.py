"""The admin UI in a real browser: Debian's chromium, driven by Playwright (never a downloaded browser).

A message sent over SMTP waits in the queue because the next hop defers it; an operator logs in,
finds it, retries it once the next hop accepts, and watches it being delivered: the dashboard
hears of it live (Server-Sent Events) and the queue empties. Its subject and sender are hostile
HTML; nothing of it may run. Screenshots go to $ARTIFACTS_DIR, else tests/artifacts/admin-browser/.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright  # the test extra; drives the system chromium
from admin_support import PASSWORD, SECRETS, USER, Http
from conftest import ROOT, free_port, require, submit, wait_for_port, wait_until
from sinks import Behaviour

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-sync"]
EVIL_SUBJECT = "<script>window.__xss = 1</script><img src=x onerror=\"window.__xss = 2\"> invoice"
EVIL_FROM = '"Mallory \\"<b onmouseover=alert(1)>\\"" <mallory@example.test>'
EVIL_SENDER = '"x\\"onmouseover=alert(1)"@example.test'


@pytest.fixture
def artifacts() -> Path:
    directory = Path(os.environ.get("ARTIFACTS_DIR") or ROOT / "tests" / "artifacts") / "admin-browser"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@pytest.fixture
def chromium():
    executable = require("chromium")  # Debian's package (.ci/setup installs it)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_FLAGS)
        try:
            yield browser
        finally:
            browser.close()


def test_an_operator_retries_a_deferred_message_and_sees_it_delivered(relay_process, sink, tmp_path, chromium,
                                                                         artifacts):
    behaviour = Behaviour(refuse={"b@": "451 4.3.0 Try again later"})
    next_hop = sink(behaviour)
    (tmp_path / "admin.secrets").write_text(SECRETS)
    conf = tmp_path / "relay.conf"
    conf.write_text(f'[admin]\nauth = "{tmp_path / "admin.secrets"}"\n')
    port = free_port()
    running = relay_process("-c", str(conf), "--admin", str(port), "--forward-to", f"127.0.0.1:{next_hop.port}")
    wait_for_port(port, running.proc)
    base = f"http://127.0.0.1:{port}"
    content = f"From: {EVIL_FROM}\r\nTo: b@example.test\r\nSubject: {EVIL_SUBJECT}\r\n\r\nPlease pay.\r\n".encode()
    assert submit(running.port, content, sender=EVIL_SENDER, recipients=["b@example.test"]) == (250, "")
    api = Http(base)
    message_id = wait_until(lambda: api.get("/api/v1/queue?state=deferred").json()["messages"],
                            what="the next hop to defer the message")[0]["id"]

    context = chromium.new_context(viewport={"width": 1280, "height": 900})
    dialogs: list[str] = []
    problems: list[str] = []
    page = context.new_page()
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(str(error)))

    # Logging in: an unauthenticated visit lands on the login form.
    page.goto(base + "/queue")
    assert page.url == f"{base}/login?next=/queue"
    page.fill("#username", USER)
    page.fill("#password", PASSWORD)
    page.click("#login")
    page.wait_for_selector("table#queue")
    assert page.url == f"{base}/queue"

    # The deferred message is listed; its hostile subject and sender are text, not markup.
    row = page.locator(f'tr.message[data-id="{message_id}"]')
    row.wait_for()
    assert row.locator("td.state").text_content() == "deferred"
    assert row.locator("td.subject").text_content() == EVIL_SUBJECT
    assert row.locator("td.sender").text_content() == EVIL_SENDER
    assert "451 4.3.0 Try again later" in row.locator("td.error").text_content()
    assert page.locator("main img, main b, main script").count() == 0
    page.screenshot(path=str(artifacts / "1-queue-deferred.png"), full_page=True)

    # Its page: envelope, attempts, headers, raw, all as text.
    row.locator("td a").first.click()
    page.wait_for_selector("#headers")
    assert page.locator("#subject").text_content() == EVIL_SUBJECT
    assert page.locator("#sender").text_content() == EVIL_SENDER
    assert f"From: {EVIL_FROM}" in page.locator("#headers").text_content()
    assert page.locator("#attempts tbody tr").count() == 1
    page.screenshot(path=str(artifacts / "2-message.png"), full_page=True)

    # The dashboard, in a second tab, listens for events while the operator retries.
    dashboard = context.new_page()
    dashboard.on("pageerror", lambda error: problems.append(str(error)))
    dashboard.goto(base + "/")
    dashboard.wait_for_selector("#live.on")  # the event stream is open
    assert dashboard.locator('[data-counter="message.deferred"]').text_content() == "1"

    behaviour.refuse.clear()  # the next hop accepts from now on
    page.click("div.actions button.retry")
    page.wait_for_selector("p.flash.ok")
    # Back on the message's page, or on the queue list when the retry delivered it at once.
    assert f"{message_id}: due now" in " ".join(page.locator("p.flash.ok").all_text_contents())

    delivered = dashboard.locator(f'tr.event[data-event="message.delivered"][data-message-id="{message_id}"]')
    delivered.wait_for(timeout=15000)  # added by the page's script from the stream, without a reload
    assert "b@example.test" in delivered.text_content()
    expect(dashboard.locator('[data-counter="message.delivered"]')).to_have_text("1", timeout=10000)
    dashboard.screenshot(path=str(artifacts / "3-dashboard-delivered.png"), full_page=True)

    page.goto(base + "/queue")
    assert page.locator(f'tr.message[data-id="{message_id}"]').count() == 0
    assert page.locator("td.empty").text_content() == "No messages."
    page.screenshot(path=str(artifacts / "4-queue-empty.png"), full_page=True)
    assert [r.sender for r in next_hop.wait_for(1)] == [EVIL_SENDER]

    # Nothing the message carried ran, and the pages needed nothing the policy forbids.
    assert page.evaluate("window.__xss") is None and dashboard.evaluate("window.__xss") is None
    assert dialogs == []
    assert problems == [], problems
    context.close()
