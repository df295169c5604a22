"""The Flask application: authentication in front of every route, security headers, JSON errors.

Public routes: ``/healthz``, ``/readyz``, the login page and the static files (CSS and the one
script, shipped in the package). Everything else, the blueprints other plugins contribute through
``relay_admin_blueprint`` included, needs a login, an API token or HTTP Basic credentials.

The app runs in the HTTP server's worker threads; what must happen in the relay (injecting a
message, bouncing one, waking the queue) is handed to the relay's event loop with
:meth:`AdminContext.run` and :meth:`AdminContext.call_soon`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Coroutine, Iterable
from urllib.parse import quote

import flask
from flask import Flask, g, jsonify, redirect, render_template, request
from werkzeug.exceptions import HTTPException, InternalServerError

from .auth import Authenticator, AuthProblem, Principal, Sessions, same
from .events import EventLog
from .settings import AdminSettings

if TYPE_CHECKING:  # pragma: no cover
    from mailrelay.relay import Relay

log = logging.getLogger("mailrelay.admin")

SESSION_COOKIE = "relay_session"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
PUBLIC_ENDPOINTS = {"healthz", "readyz", "ui.login", "static"}
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
#: Waiting for the relay's loop (an injection runs the policies and the server filters).
LOOP_TIMEOUT = 300.0


@dataclass
class AdminContext:
    """What the routes need: the relay, its loop, logins, events and the settings."""

    relay: Relay
    loop: asyncio.AbstractEventLoop
    settings: AdminSettings
    auth: Authenticator
    sessions: Sessions
    events: EventLog
    ready: Callable[[], bool]

    def __post_init__(self) -> None:
        self.streams = threading.BoundedSemaphore(self.settings.max_streams) if self.settings.max_streams else None

    def run(self, coroutine: Coroutine[Any, Any, Any], timeout: float = LOOP_TIMEOUT) -> Any:
        """Run ``coroutine`` in the relay's event loop and wait for its result (worker threads only)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def call_soon(self, function: Callable[..., Any], *args: Any) -> None:
        self.loop.call_soon_threadsafe(function, *args)

    def wake_queue(self) -> None:
        """Ask the queue runner to scan now (after a retry)."""
        queue = self.relay.queue
        if queue is not None:
            self.call_soon(queue.wake)


def context() -> AdminContext:
    ctx: AdminContext = flask.current_app.extensions["mailrelay_admin"]
    return ctx


def principal() -> Principal:
    found: Principal = g.principal
    return found


def wants_json() -> bool:
    return request.path.startswith("/api/") or request.accept_mimetypes.best == "application/json"


def is_browser() -> bool:
    """Browsers name text/html in Accept; scrapers and scripts (``*/*`` at most) get a 401, not a
    redirect to the login form."""
    return any(value == "text/html" for value, _ in request.accept_mimetypes)


def json_error(status: int, error: str, detail: str, headers: dict[str, str] | None = None) -> flask.Response:
    response = jsonify({"error": error, "detail": detail})
    response.status_code = status
    response.headers.update(headers or {})
    return response


def create_app(ctx: AdminContext, blueprints: Iterable[flask.Blueprint] = ()) -> Flask:
    """The admin application for one relay."""
    from . import api, ui  # the blueprints import helpers from this module

    app = Flask(__name__, static_folder="static", template_folder="templates")
    app.extensions["mailrelay_admin"] = ctx
    size = ctx.relay.settings.smtp.size
    # A JSON message carries its attachments in base64: a third more than the message itself.
    app.config.update(MAX_CONTENT_LENGTH=(size * 4 // 3 + (1 << 20)) if size else 1 << 30,
                      SEND_FILE_MAX_AGE_DEFAULT=0, TEMPLATES_AUTO_RELOAD=False)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.register_blueprint(api.blueprint)
    app.register_blueprint(ui.blueprint)
    for blueprint in blueprints:
        try:
            app.register_blueprint(blueprint)
        except (ValueError, AssertionError) as e:  # a name or route clash: the rest still serves
            log.error("admin: blueprint %r not mounted: %s", getattr(blueprint, "name", blueprint), e)

    @app.get("/healthz")
    def healthz() -> Any:
        """Liveness: the admin server answers."""
        return jsonify({"status": "ok"})

    @app.get("/readyz")
    def readyz() -> Any:
        """Readiness: the relay has started and its spool directory is writable."""
        spool = str(ctx.relay.spool.directory)
        checks = {"started": ctx.ready(), "spool_writable": os.access(spool, os.W_OK | os.X_OK)}
        ready = all(checks.values())
        response = jsonify({"status": "ready" if ready else "not ready", "checks": checks})
        response.status_code = 200 if ready else 503
        return response

    app.before_request(_authenticate)
    app.after_request(_security_headers)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(AuthProblem, _auth_problem)
    app.context_processor(_template_helpers)
    return app


def _authenticate() -> Any:
    """Every request: refuse cross-site writes, then require a caller unless the route is public."""
    g.principal = None
    if request.method not in SAFE_METHODS and not _same_origin():
        return json_error(403, "cross_origin", "state-changing requests must come from this site")
    if request.endpoint is None or request.endpoint in PUBLIC_ENDPOINTS:
        return None  # routing failed (404/405, answered by the error handler) or a public route
    ctx = context()
    header = request.headers.get("Authorization")
    if header:
        g.principal = ctx.auth.from_header(header, request.environ)  # AuthProblem: _auth_problem
        return None
    session = ctx.sessions.get(request.cookies.get(SESSION_COOKIE, ""))
    if session is None:
        if wants_json() or not is_browser():
            return json_error(401, "unauthorized", "log in, or send an API token or Basic credentials",
                              {"WWW-Authenticate": 'Basic realm="mailrelay", charset="UTF-8"'})
        if request.method not in SAFE_METHODS:  # a form posted after the session ended
            return redirect("/login", 303)
        return redirect(f"/login?next={quote(request.full_path if request.query_string else request.path)}")
    if request.method not in SAFE_METHODS:
        sent = request.headers.get(CSRF_HEADER) or request.form.get(CSRF_FIELD, "")
        if not sent or not same(sent, session.csrf):
            return json_error(403, "csrf", "missing or wrong CSRF token; reload the page and try again")
    g.principal = Principal(session.user, "session", session)
    return None


def _same_origin() -> bool:
    """A browser tells where a request comes from; any other site (or port) may not write here.
    Clients that are not browsers send neither header."""
    if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
        return False
    origin = request.headers.get("Origin")
    return origin is None or origin == request.host_url.rstrip("/")


def _security_headers(response: flask.Response) -> flask.Response:
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    # Not "no-referrer": browsers then send "Origin: null" with the forms, which _same_origin refuses.
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["Cross-Origin-Opener-Policy"] = "same-origin"
    if request.endpoint != "static":
        response.headers["Cache-Control"] = "no-store"
    return response


def _http_error(error: HTTPException) -> Any:
    code = error.code or 500
    if isinstance(error, InternalServerError) and error.original_exception is not None:
        log.error("admin: %s %s failed", request.method, request.path, exc_info=error.original_exception)
    name = (error.name or "error").lower().replace(" ", "_")
    detail = error.description or ""
    if wants_json():
        allowed = getattr(error, "valid_methods", None)  # a 405 says what is allowed
        headers = {"Allow": ", ".join(allowed)} if allowed else {}
        return json_error(code, name, detail, headers)
    return render_template("error.html", code=code, title=error.name, detail=detail), code


def _auth_problem(problem: AuthProblem) -> Any:
    headers = {"Retry-After": str(problem.retry_after)} if problem.retry_after else {}
    if problem.status == 401:
        headers["WWW-Authenticate"] = 'Basic realm="mailrelay", charset="UTF-8"'
    return json_error(problem.status, problem.error, problem.detail, headers)


def _template_helpers() -> dict[str, Any]:
    def csrf_token() -> str:
        p = g.get("principal")
        return p.session.csrf if p is not None and p.session is not None else ""

    def flashes() -> list[tuple[str, str]]:
        p = g.get("principal")
        if p is None or p.session is None:
            return []
        taken, p.session.flashes = p.session.flashes, []
        return taken

    return {"csrf_token": csrf_token, "flashes": flashes, "user": (g.get("principal") or Principal("", "")).user}
