"""The JSON API under ``/api/v1`` (described by ``openapi.json``, served at ``/api/v1/openapi.json``).

Queue operations are :mod:`mailrelay.queue.admin`'s, as ``relay queue ...`` runs them; new
messages go through :func:`mailrelay.inject.inject`, the policies, filters and durable commit of
SMTP. Every error is ``{"error": ..., "detail": ...}`` with a 4xx (or 5xx) status; a message id
that is not a spool id is a 404 before it can name any file.
"""

from __future__ import annotations

import concurrent.futures
import importlib.resources
import json
import logging
import os
import signal
import time
from typing import Any, Callable

from flask import Blueprint, Response, jsonify, request, send_file

from mailrelay.config import ConfigError
from mailrelay.inject import InjectionRefused, inject
from mailrelay.queue import admin

from . import config_edit
from .app import context, json_error, principal
from .compose import ComposeError, compose
from .queue_view import BadQuery, QueueQuery, gauges, search

log = logging.getLogger("mailrelay.admin")

blueprint = Blueprint("api", __name__, url_prefix="/api/v1")
OPENAPI = json.loads(importlib.resources.files(__package__).joinpath("openapi.json").read_text("utf-8"))
#: Counters the stats always show (0 until the first such event), as they are named in events.
STANDARD_COUNTERS = ("received", "rejected", "smtp.rejected", "quarantined", "discarded", "message.delivered",
                     "message.deferred", "message.bounced", "message.expired", "auth.failed")
RETRY_AFTER = "60"  # seconds, for a temporary refusal of an injected message


class ApiError(Exception):
    """Answered as ``{"error", "detail", **extra}`` with ``status``."""

    def __init__(self, status: int, error: str, detail: str, headers: dict[str, str] | None = None,
                 **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail, self.headers, self.extra = status, error, detail, headers or {}, extra


@blueprint.errorhandler(ApiError)
def _api_error(e: ApiError) -> Response:
    response = json_error(e.status, e.error, e.detail, e.headers)
    if e.extra:
        response.set_data(json.dumps({"error": e.error, "detail": e.detail, **e.extra}))
    return response


def queue_operation(operation: Callable[[], Any]) -> Any:
    """Run a :mod:`mailrelay.queue.admin` operation; its errors become API errors."""
    try:
        return operation()
    except (admin.InvalidId, admin.UnknownMessage) as e:
        raise ApiError(404, "not_found", str(e)) from None
    except admin.MessageBusy as e:
        raise ApiError(409, "busy", str(e)) from None
    except admin.UnreadableMessage as e:
        raise ApiError(500, "unreadable", str(e)) from None
    except admin.QueueAdminError as e:
        raise ApiError(409, "conflict", str(e)) from None
    except FileNotFoundError as e:  # delivered or deleted between two looks
        raise ApiError(404, "not_found", f"{os.path.basename(e.filename or '')}: no longer in the spool") from None
    except OSError as e:
        raise ApiError(500, "spool_error", f"{e.filename or 'spool'}: {e.strerror or e}") from None


def retry(message_id: str) -> admin.RetryResult:
    ctx = context()
    result: admin.RetryResult = queue_operation(lambda: admin.retry_message(ctx.relay.spool, message_id))
    ctx.wake_queue()
    return result


def retry_everything() -> tuple[list[admin.RetryResult], list[str]]:
    ctx = context()
    done, busy = queue_operation(lambda: admin.retry_all(ctx.relay.spool))
    ctx.wake_queue()
    return done, busy


def bounce(message_id: str) -> admin.BounceResult:
    ctx = context()
    relay = ctx.relay
    queue_operation(lambda: admin.show_message(relay.spool, message_id))  # the id checked here first
    # The report is committed through the relay's open spool: in its event loop.
    result: admin.BounceResult = queue_operation(lambda: ctx.run(
        admin.bounce_message(relay.spool, message_id, reporting_mta=relay.domain)))
    ctx.wake_queue()
    return result


# ---------------------------------------------------------------- queue
@blueprint.get("/openapi.json")
def openapi() -> Any:
    return jsonify(OPENAPI)


@blueprint.get("/queue")
def queue_list() -> Any:
    try:
        query = QueueQuery.from_args(request.args, request.args.getlist)
    except BadQuery as e:
        raise ApiError(400, "bad_request", str(e)) from None
    total, rows = queue_operation(lambda: search(context().relay.spool, query))
    return jsonify({"total": total, "offset": query.offset, "limit": query.limit, "messages": rows})


@blueprint.post("/queue/retry-all")
def queue_retry_all() -> Any:
    done, busy = retry_everything()
    return jsonify({"retried": [{"id": r.id, "was": r.was} for r in done], "busy": busy})


@blueprint.get("/queue/<message_id>")
def queue_show(message_id: str) -> Any:
    details = queue_operation(lambda: admin.show_message(context().relay.spool, message_id))
    return jsonify(details.to_dict())


@blueprint.get("/queue/<message_id>/raw")
def queue_raw(message_id: str) -> Any:
    spool = context().relay.spool
    queue_operation(lambda: admin.show_message(spool, message_id))
    content = queue_operation(lambda: open(spool.content_path(message_id), "rb"))
    return send_file(content, mimetype="message/rfc822", as_attachment=True, download_name=f"{message_id}.eml")


@blueprint.post("/queue/<message_id>/retry")
def queue_retry(message_id: str) -> Any:
    result = retry(message_id)
    return jsonify({"id": result.id, "was": result.was, "changed": result.changed})


@blueprint.delete("/queue/<message_id>")
def queue_delete(message_id: str) -> Any:
    was = queue_operation(lambda: admin.delete_message(context().relay.spool, message_id))
    return jsonify({"id": message_id, "deleted": True, "was": was})


@blueprint.post("/queue/<message_id>/bounce")
def queue_bounce(message_id: str) -> Any:
    result = bounce(message_id)
    return jsonify({"id": result.id, "sender": result.sender, "recipients": list(result.recipients),
                    "report_id": result.report_id})


# ---------------------------------------------------------------- new messages
@blueprint.post("/messages")
def messages_inject() -> Any:
    ctx = context()
    if request.mimetype == "application/json":
        data = request.get_json(silent=True)
        if data is None:
            raise ApiError(400, "bad_request", "the body is not JSON")
        try:
            composed = compose(data, ctx.relay.domain)
        except ComposeError as e:
            raise ApiError(400, "bad_request", str(e)) from None
        sender, recipients, content = composed.sender, composed.recipients, composed.content
    elif request.mimetype == "message/rfc822":
        if "from" not in request.args:
            raise ApiError(400, "bad_request", "give the envelope sender as ?from=ADDRESS (empty for <>)")
        sender = request.args["from"]
        recipients = [r.strip() for value in request.args.getlist("to") for r in value.split(",") if r.strip()]
        if not recipients:
            raise ApiError(400, "bad_request", "give the recipients as ?to=ADDRESS (repeatable)")
        content = request.get_data()
    else:
        raise ApiError(415, "unsupported_media_type", "send application/json, or message/rfc822 with "
                       "?from=...&to=...")
    try:
        injected = ctx.run(inject(ctx.relay, sender, recipients, content,
                                  client_ip=request.remote_addr or "", auth_user=principal().user))
    except InjectionRefused as e:
        refused = [{"recipient": r, "reply": reply} for r, reply in e.refused]
        if e.temporary:
            raise ApiError(503, "temporarily_refused", e.reply, {"Retry-After": RETRY_AFTER},
                           refused=refused) from None
        status, error = (413, "too_large") if e.code == 552 else (422, "refused")
        raise ApiError(status, error, e.reply, refused=refused) from None
    except concurrent.futures.TimeoutError:
        raise ApiError(503, "timeout", "the relay did not answer in time", {"Retry-After": RETRY_AFTER}) from None
    body = {"id": injected.message_id or None, "reply": injected.reply,
            "refused": [{"recipient": r, "reply": reply} for r, reply in injected.refused]}
    response = jsonify(body)
    response.status_code = 202
    if injected.message_id:
        response.headers["Location"] = f"/api/v1/queue/{injected.message_id}"
    return response


# ---------------------------------------------------------------- observing
@blueprint.get("/stats")
def stats() -> Any:
    ctx = context()
    counts = ctx.events.counts()
    now = time.time()
    return jsonify({"since": ctx.events.started, "uptime": round(now - ctx.events.started, 3),
                    "counters": {**{name: 0 for name in STANDARD_COUNTERS}, **counts},
                    "queue": queue_operation(lambda: gauges(ctx.relay.spool, now))})


@blueprint.get("/events")
def events() -> Any:
    since, limit = _number("since", 0, 0, 2**62), _number("limit", 100, 1, 10000)
    names = {n.strip() for n in request.args.get("name", "").split(",") if n.strip()} or None
    found = context().events.recent(since, limit, names)
    return jsonify({"events": [e.to_dict() for e in found], "last": found[-1].seq if found else since})


@blueprint.get("/events/stream")
def events_stream() -> Any:
    ctx = context()
    since = request.headers.get("Last-Event-ID", "") or request.args.get("since", "0")
    if not since.isdigit():
        raise ApiError(400, "bad_request", "since / Last-Event-ID: expected a sequence number")
    if ctx.streams is None or not ctx.streams.acquire(blocking=False):
        raise ApiError(503, "too_many_streams", "too many event streams are open ([admin] max_streams)",
                       {"Retry-After": "10"})
    streams = ctx.streams

    def generate() -> Any:
        try:
            yield from ctx.events.stream(int(since))
        finally:
            streams.release()

    return Response(generate(), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


@blueprint.get("/plugins")
def plugins() -> Any:
    rows = context().relay.plugins.info()
    return jsonify([{"name": r.name, "version": r.version, "package": r.package, "value": r.value,
                     "enabled": r.enabled, "builtin": r.builtin, "hooks": list(r.hooks)} for r in rows])


# ---------------------------------------------------------------- configuration
def _config_path() -> str:
    path = context().relay.settings.config_file
    if not path:
        raise ApiError(404, "no_config_file", "the relay was started without a configuration file")
    return path


@blueprint.get("/config")
def config_get() -> Any:
    path = _config_path()
    try:
        current = config_edit.read(path)
    except (OSError, ConfigError) as e:
        raise ApiError(500, "unreadable", f"{path}: {getattr(e, 'strerror', None) or e}") from None
    response = jsonify({"file": path, "text": current.text, "etag": current.etag})
    response.headers["ETag"] = current.etag
    return response


@blueprint.put("/config")
def config_put() -> Any:
    path = _config_path()
    if request.mimetype == "application/json":
        data = request.get_json(silent=True)
        text = data.get("text") if isinstance(data, dict) else None
        if not isinstance(text, str):
            raise ApiError(400, "bad_request", 'expected {"text": "...relay.conf..."}')
    else:
        try:
            text = request.get_data().decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, "bad_request", "the configuration must be UTF-8 text") from None
    outcome = apply_config(path, text, request.headers.get("If-Match"), request.args.get("dry_run") in ("1", "true"))
    return jsonify(outcome)


def apply_config(path: str, text: str, if_match: str | None, dry_run: bool) -> dict[str, Any]:
    """Validate and (unless ``dry_run``) save; what the API and the UI's editor both answer."""
    try:
        old = config_edit.read(path).text
        warnings = config_edit.validate(path, text)
    except ConfigError as e:
        raise ApiError(422, "invalid_config", str(e)) from None
    except OSError as e:
        raise ApiError(403, "not_writable", f"cannot check {path} in its directory: {e.strerror or e}") from None
    changed = config_edit.changed_keys(old, text)
    result: dict[str, Any] = {"valid": True, "saved": False, "file": path, "warnings": warnings, "changed": changed,
                              "restart_required": bool(changed), "reloaded": []}
    if dry_run:
        return result
    try:
        backup = config_edit.save(path, text, if_match)
    except config_edit.ConfigConflict as e:
        raise ApiError(412, "changed", str(e)) from None
    except OSError as e:
        raise ApiError(403, "not_writable", f"cannot write {path}: {e.strerror or e}") from None
    log.warning("admin: user=%r saved %s (backup %s); changed: %s", principal().user, path, backup,
                ", ".join(changed) or "nothing")
    result.update(saved=True, backup=str(backup), detail=(
        "saved; the relay reads its configuration only at start-up: restart it to apply the changes"
        if changed else "saved; nothing changed"))
    return result


@blueprint.post("/terminate")
def terminate() -> Any:
    """E-MailRelay's --admin-terminate: stop the relay as SIGTERM does (when enabled)."""
    ctx = context()
    if not ctx.settings.terminate:
        raise ApiError(403, "forbidden", "terminating over the admin API is not enabled (--admin-terminate)")
    log.warning("admin: user=%r asked the relay to terminate", principal().user)
    ctx.call_soon(ctx.loop.call_later, 0.2, os.kill, os.getpid(), signal.SIGTERM)
    response = jsonify({"terminating": True})
    response.status_code = 202
    return response


def _number(key: str, default: int, low: int, high: int) -> int:
    value = request.args.get(key, "").strip()
    if not value:
        return default
    if not value.isdigit() or not low <= int(value) <= high:
        raise ApiError(400, "bad_request", f"{key}: expected a whole number from {low} to {high}")
    return int(value)
