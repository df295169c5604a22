"""Helpers for the admin plugin's tests: a relay with the admin server, HTTP clients, log-ins."""

from __future__ import annotations

import base64
import http.client
import json
import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mailrelay_sdk.testing import RunningRelay

USER, PASSWORD = "alice", "s3cret-Pw"
SECRETS = f"server plain {USER} {PASSWORD}\n"
MESSAGE = b"From: a@example.test\r\nTo: b@example.test\r\nSubject: hello\r\n\r\nbody\r\n"


def basic(user: str = USER, password: str = PASSWORD) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        assert self.headers.get_content_type() == "application/json", (self.status, self.body[:200])
        return json.loads(self.body)


class Http:
    """Real HTTP(S) to the admin server (no redirects followed, any path sent as given)."""

    def __init__(self, url: str, auth: str | None = basic(), context: ssl.SSLContext | None = None) -> None:
        parts = urlsplit(url)
        self.host, self.port, self.https = parts.hostname, parts.port, parts.scheme == "https"
        self.auth, self.context = auth, context

    def connection(self, timeout: float = 15) -> http.client.HTTPConnection:
        if self.https:
            return http.client.HTTPSConnection(self.host, self.port, timeout=timeout, context=self.context)
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def request(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
                auth: str | None | bool = True) -> Reply:
        headers = dict(headers or {})
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
        token = self.auth if auth is True else (auth or None)
        if token:
            headers["Authorization"] = token
        conn = self.connection()
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            return Reply(response.status, response.headers, response.read())
        finally:
            conn.close()

    def get(self, path: str, **kw: Any) -> Reply:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> Reply:
        return self.request("POST", path, body, **kw)


@dataclass
class AdminRelay:
    """An in-process relay with the admin plugin: the relay, the plugin, its Flask app."""

    running: RunningRelay
    plugin: Any

    @property
    def relay(self) -> Any:
        return self.running.relay

    @property
    def app(self) -> Any:
        return self.plugin.listener.app

    @property
    def url(self) -> str:
        return self.plugin.listener.urls[0]

    def http(self, **kw: Any) -> Http:
        return Http(self.url, **kw)

    def client(self, **environ: Any) -> Any:
        """A Flask test client (REMOTE_ADDR 127.0.0.1 unless given)."""
        client = self.app.test_client()
        client.environ_base.update(environ)
        return client


def start_admin(inprocess_relay: Any, tmp_path: Path, *, admin: dict[str, Any] | None = None,
                config: dict[str, Any] | None = None, plugins: dict[str, Any] | None = None,
                enable: tuple[str, ...] = ()) -> AdminRelay:
    """A relay with the admin plugin on a free loopback port, logins from a secrets file."""
    secrets = tmp_path / "admin.secrets"
    if not secrets.exists():
        secrets.write_text(SECRETS)
    settings = {"listen": ["127.0.0.1:0"], "auth": str(secrets), **(admin or {})}
    running = inprocess_relay(plugins=plugins, enable=[*enable, "admin"], config={"admin": settings, **(config or {})})
    return AdminRelay(running, running.host.pm.get_plugin("admin"))


def login(client: Any, user: str = USER, password: str = PASSWORD) -> Any:
    """Log a Flask test client in through the form; return the response to the form."""
    page = client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.get_data(as_text=True)).group(1)
    return client.post("/login", data={"csrf_token": token, "username": user, "password": password, "next": "/"})


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)
