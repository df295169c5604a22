"""The browser UI: server-rendered pages over the same operations as the API.

Jinja escapes everything it renders (subjects, addresses, headers, errors: all come from
outside); the one script (``static/app.js``) only sets ``textContent``. Every form posts with the
session's CSRF token; the login form, which has no session yet, uses a double-submit cookie.
"""

from __future__ import annotations

import re
import secrets
import time
from typing import Any

from flask import Blueprint, make_response, redirect, render_template, request, url_for

from mailrelay.queue import admin
from mailrelay_sdk import Event

from . import api
from .api import ApiError, apply_config, queue_operation
from .app import SESSION_COOKIE, context, principal
from .auth import AuthProblem, UiSession, same, secure_channel
from .queue_view import BadQuery, QueueQuery, gauges, search, subject_of

blueprint = Blueprint("ui", __name__)
LOGIN_COOKIE = "relay_login"
RAW_PREVIEW = 64 * 1024  # octets of the message shown on its page (the rest: download)
DASHBOARD_EVENTS = ("received", "rejected", "quarantined", "message.delivered", "message.deferred",
                    "message.bounced", "message.expired")


@blueprint.app_template_filter("when")
def _when(timestamp: float | None) -> str:
    if not timestamp:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


@blueprint.app_template_filter("age")
def _age(timestamp: float | None) -> str:
    if not timestamp:
        return "-"
    seconds = max(0, int(time.time() - timestamp))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


@blueprint.app_template_global("event_summary")
def _event_summary(event: Event) -> str:
    """One line about an event for the dashboard (as static/app.js writes it for live ones)."""
    d = event.data
    if event.name in ("received", "quarantined"):
        return f"from <{d.get('sender', '')}> to {', '.join(map(str, d.get('recipients') or []))}"
    return ": ".join(str(p) for p in (d.get("recipient"), d.get("reply") or d.get("error") or d.get("reason")) if p)


def _flash(category: str, text: str) -> None:
    session: UiSession | None = principal().session
    if session is not None:
        session.flashes.append((category, text))


def _safe_next(target: str | None) -> str:
    """Only a path on this site (never ``//host`` or ``/\\host``) may follow a login."""
    if target and target.startswith("/") and not target.startswith(("//", "/\\")) and "\n" not in target:
        return target
    return url_for("ui.dashboard")


# ---------------------------------------------------------------- logging in and out
@blueprint.route("/login", methods=["GET", "POST"])
def login() -> Any:
    ctx = context()
    if request.method == "GET":
        return _login_page(request.args.get("next", ""))
    next_page = request.form.get("next", "")
    cookie, sent = request.cookies.get(LOGIN_COOKIE, ""), request.form.get("csrf_token", "")
    if not cookie or not sent or not same(cookie, sent):
        return _login_page(next_page, "The form expired; please try again.", 403)
    if not secure_channel(request.environ):
        return _login_page(next_page, "Passwords are accepted only over HTTPS or from this host.", 403)
    username, password = request.form.get("username", ""), request.form.get("password", "")
    try:
        ok = ctx.auth.check_password(request.remote_addr or "", username, password)
    except AuthProblem as problem:
        return _login_page(next_page, problem.detail[:1].upper() + problem.detail[1:] + ".", problem.status)
    if not ok:
        return _login_page(next_page, "Wrong user name or password.", 401)
    session = ctx.sessions.create(username)
    response = redirect(_safe_next(next_page), 303)
    response.set_cookie(SESSION_COOKIE, session.id, max_age=int(ctx.settings.session_lifetime), path="/",
                        secure=request.is_secure, httponly=True, samesite="Strict")
    response.delete_cookie(LOGIN_COOKIE, path="/login")
    return response


def _login_page(next_page: str, error: str = "", status: int = 200) -> Any:
    token = secrets.token_urlsafe(32)
    response = make_response(render_template("login.html", login_token=token, next_page=next_page, error=error),
                             status)
    response.set_cookie(LOGIN_COOKIE, token, max_age=3600, path="/login", secure=request.is_secure,
                        httponly=True, samesite="Strict")
    return response


@blueprint.post("/logout")
def logout() -> Any:
    session = principal().session
    if session is not None:
        context().sessions.end(session.id)
    response = redirect(url_for("ui.login"), 303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


# ---------------------------------------------------------------- pages
@blueprint.get("/")
def dashboard() -> Any:
    ctx = context()
    counts = ctx.events.counts()
    recent = list(reversed(ctx.events.recent(0, 50, set(DASHBOARD_EVENTS))))
    latest = ctx.events.recent(0, 1)
    queue = queue_operation(lambda: gauges(ctx.relay.spool))
    return render_template("dashboard.html", counts=counts, queue=queue, recent=recent,
                           last_seq=latest[-1].seq if latest else 0, counters=api.STANDARD_COUNTERS)


@blueprint.get("/queue")
def queue_page() -> Any:
    error = ""
    try:
        query = QueueQuery.from_args(request.args, request.args.getlist)
    except BadQuery as e:
        query, error = QueueQuery(), str(e)
    total, rows = queue_operation(lambda: search(context().relay.spool, query))
    args = {k: v for k, v in request.args.items() if k != "offset" and v}
    return render_template("queue.html", rows=rows, total=total, query=query, error=error, args=args,
                           states=admin.QUEUE_STATES)


@blueprint.get("/queue/<message_id>")
def message_page(message_id: str) -> Any:
    spool = context().relay.spool
    try:
        details = queue_operation(lambda: admin.show_message(spool, message_id))
        with open(spool.content_path(message_id), "rb") as f:
            raw = f.read(RAW_PREVIEW + 1)
    except (ApiError, FileNotFoundError) as e:
        detail = e.detail if isinstance(e, ApiError) else "no longer in the spool"
        if request.args.get("acted"):
            _flash("ok", f"{message_id} is no longer in the queue (delivered or removed).")
            return redirect(url_for("ui.queue_page"), 303)
        return render_template("error.html", code=404, title="No such message", detail=detail), 404
    return render_template("message.html", m=details.to_dict(), raw=raw[:RAW_PREVIEW].decode("utf-8", "replace"),
                           truncated=len(raw) > RAW_PREVIEW, subject=subject_of(details.headers))


@blueprint.post("/queue/retry-all")
def queue_retry_all() -> Any:
    try:
        done, busy = api.retry_everything()
        _flash("ok", f"Retried {len(done)} message(s)" + (f"; {len(busy)} being forwarded now, left alone"
                                                           if busy else "") + ".")
    except ApiError as e:
        _flash("error", e.detail)
    return redirect(url_for("ui.queue_page"), 303)


@blueprint.post("/queue/<message_id>/<action>")
def queue_action(message_id: str, action: str) -> Any:
    try:
        if action == "retry":
            api.retry(message_id)
            _flash("ok", f"{message_id}: due now; the queue runner was woken.")
        elif action == "delete":
            queue_operation(lambda: admin.delete_message(context().relay.spool, message_id))
            _flash("ok", f"{message_id}: deleted.")
        elif action == "bounce":
            result = api.bounce(message_id)
            _flash("ok", f"{message_id}: returned to the sender" + (f" (report {result.report_id})."
                                                                     if result.report_id else " (no report)."))
        else:
            return render_template("error.html", code=404, title="Not Found", detail="no such action"), 404
    except ApiError as e:
        _flash("error", e.detail)
    back = request.form.get("back", "")
    # Back to the message's own page, marked: after a delete or bounce, or a retry that delivered
    # it at once, the message is gone, and that page then sends the operator to the queue instead.
    if back.split("?")[0] == url_for("ui.message_page", message_id=message_id):
        back = url_for("ui.message_page", message_id=message_id, acted=1)
    return redirect(_safe_next(back) if back else url_for("ui.queue_page"), 303)


@blueprint.route("/config", methods=["GET", "POST"])
def config_page() -> Any:
    ctx = context()
    path = ctx.relay.settings.config_file
    if not path:
        return render_template("config.html", path="", text="", etag="", error="", error_line=0)
    if request.method == "GET":
        try:
            current = api.config_edit.read(path)
        except (OSError, api.ConfigError) as e:
            return render_template("error.html", code=500, title="Cannot read the configuration", detail=str(e)), 500
        return render_template("config.html", path=path, text=current.text, etag=current.etag, error="",
                               error_line=0)
    text = request.form.get("text", "").replace("\r\n", "\n")
    etag, dry_run = request.form.get("etag", ""), request.form.get("action") == "check"
    try:
        result = apply_config(path, text, etag or None, dry_run)
    except ApiError as e:
        line = re.search(rf"{re.escape(path)}:(\d+):", e.detail) or re.search(r"line (\d+)", e.detail)
        return render_template("config.html", path=path, text=text, etag=etag, error=e.detail,
                               error_line=int(line.group(1)) if line else 0), e.status
    changed = ", ".join(result["changed"]) or "nothing"
    if dry_run:
        return render_template("config.html", path=path, text=text, etag=etag, error="", error_line=0,
                               notice=f"Valid. Would change: {changed}.")
    _flash("ok", f"Saved (backup: {result['backup']}). Changed: {changed}."
           + (" Restart the relay to apply the changes." if result["restart_required"] else ""))
    return redirect(url_for("ui.config_page"), 303)


@blueprint.get("/plugins")
def plugins_page() -> Any:
    return render_template("plugins.html", rows=context().relay.plugins.info())
