"""The admin HTTP(S) server: cheroot, in threads of its own, off the relay's event loop.

Why cheroot (CherryPy's server) rather than waitress: both are production WSGI servers with a
thread per request in flight, but waitress has no TLS at all (it expects a proxy in front), and
``[admin] tls_certificate`` must give HTTPS without one. cheroot speaks TLS with the standard
library's ``ssl``, streams a response as the app yields it (the event stream), and stops cleanly
from another thread.

Two adjustments: the listening sockets are bound by :mod:`mailrelay.net` like the SMTP ones (the
same address rules and errors), and the TLS handshake is left to the worker thread that serves
the connection. cheroot's own adapter shakes hands in its accepting thread, where one client
that connects and stays silent would hold up every other connection until the timeout.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import socket
import ssl
import threading
from typing import Any, Callable

from cheroot import wsgi
from cheroot.makefile import StreamReader, StreamWriter
from cheroot.server import HTTPConnection
from cheroot.ssl import Adapter

from mailrelay import net
from mailrelay.config.loader import ConfigError
from mailrelay.config.settings import TlsSettings
from mailrelay.tls import build_server_context

log = logging.getLogger("mailrelay.admin")

#: WSGI environ key set on requests that came over a Unix socket.
LOCAL_SOCKET = "mailrelay.local_socket"
REQUEST_TIMEOUT = 10  # seconds a client may take to send its request (and to read each write)
SHUTDOWN_TIMEOUT = 5  # seconds requests in flight get when the relay stops


class WorkerHandshakeTls(Adapter):  # type: ignore[misc]
    """cheroot TLS adapter that leaves the handshake to the worker thread (:class:`_Connection`)."""

    def __init__(self, context: ssl.SSLContext) -> None:  # no files to load: the context is ready
        self.context = context
        self.certificate = self.private_key = self.certificate_chain = self.ciphers = None

    def bind(self, sock: socket.socket) -> socket.socket:
        return sock

    def wrap(self, sock: socket.socket) -> tuple[ssl.SSLSocket, dict[str, str]]:
        wrapped = self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return wrapped, self.get_environ()

    def get_environ(self) -> dict[str, str]:
        return {"wsgi.url_scheme": "https", "HTTPS": "on"}

    def makefile(self, sock: Any, mode: str = "r", bufsize: int = io.DEFAULT_BUFFER_SIZE) -> Any:
        return (StreamReader if "r" in mode else StreamWriter)(sock, mode, bufsize)


class _Connection(HTTPConnection):  # type: ignore[misc]
    """A connection whose TLS handshake, if any, is done first, in the worker thread; one that
    fails (a scanner, plain HTTP to the HTTPS port, a client that gave up) is closed quietly."""

    handshaken = False

    def communicate(self) -> bool:
        if isinstance(self.socket, ssl.SSLSocket) and not self.handshaken:
            try:
                self.socket.do_handshake()  # under the server's timeout
            except OSError as e:  # ssl.SSLError and timeouts included
                log.debug("admin https: no TLS handshake with %s: %s", self.remote_addr, e)
                return False
            self.handshaken = True
        keep: bool = super().communicate()
        return keep


def _local_socket(app: Callable[..., Any]) -> Callable[..., Any]:
    """Requests on a Unix socket come from whoever may open its file: local, like loopback."""
    def wrapped(environ: dict[str, Any], start_response: Any) -> Any:
        environ[LOCAL_SOCKET] = True
        return app(environ, start_response)
    return wrapped


class _Server(wsgi.Server):  # type: ignore[misc]
    """cheroot's server on a socket bound beforehand (TCP or Unix), logging through ``logging``."""

    ConnectionClass = _Connection

    def __init__(self, sock: socket.socket, app: Callable[..., Any], threads: int) -> None:
        unix = sock.family == socket.AF_UNIX
        super().__init__(sock.getsockname() if unix else sock.getsockname()[:2], _local_socket(app) if unix else app,
                         numthreads=threads, max=threads, server_name="mailrelay-admin", request_queue_size=128,
                         timeout=REQUEST_TIMEOUT, shutdown_timeout=SHUTDOWN_TIMEOUT)
        self._bound = sock

    def bind(self, family: int, type: int, proto: int = 0) -> socket.socket:
        self.socket = self._bound
        self.bind_addr = self._bound.getsockname()[:2]
        return self._bound

    def bind_unix_socket(self, bind_addr: str) -> socket.socket:
        self.socket = self._bound  # bound (and given its permissions) by mailrelay.net
        return self._bound

    def error_log(self, msg: str = "", level: int = logging.INFO, traceback: bool = False) -> None:
        # Clients that drop connections or speak plain HTTP to the HTTPS port are routine.
        log.log(logging.ERROR if traceback else logging.DEBUG, "admin http: %s", msg, exc_info=traceback)


class AdminServer:
    """One cheroot server per listening address, each with a thread that accepts."""

    def __init__(self, app: Callable[..., Any], addresses: list[tuple[str, int]], threads: int,
                 tls_certificate: str = "", tls_key: str = "", inherited: list[socket.socket] | None = None,
                 unix_mode: int = 0o660) -> None:
        """``addresses``: (IP address or Unix socket path, port); ``inherited``: listening sockets
        bound by someone else (systemd's socket activation); ``unix_mode``: Unix sockets' permissions."""
        self.app = app
        self.unix_mode = unix_mode
        self.wanted = addresses
        self.inherited = list(inherited or [])
        self.threads = threads
        self.tls_certificate, self.tls_key = tls_certificate, tls_key
        self._servers: list[_Server] = []
        self._threads: list[threading.Thread] = []

    @property
    def scheme(self) -> str:
        return "https" if self.tls_certificate else "http"

    @property
    def urls(self) -> list[str]:
        """Where it listens: ``http://127.0.0.1:8025`` (the bound port, if 0 was asked for)."""
        out = []
        for server in self._servers:
            if isinstance(server.bind_addr, str):
                out.append(f"{self.scheme}+unix://{server.bind_addr}")
                continue
            host, port = server.bind_addr[:2]
            out.append(f"{self.scheme}://{'[' + host + ']' if ':' in host else host}:{port}")
        return out

    async def start(self) -> None:
        """Bind, load the certificate, start serving; raises (and binds nothing) on any failure."""
        if os.environ.get("LISTEN_PID"):
            # cheroot would take descriptor 3 as its socket (systemd socket activation).
            raise ConfigError("the admin server cannot run under systemd socket activation (LISTEN_PID is set)")
        adapter = None
        if self.tls_certificate:
            settings = TlsSettings(certificate=self.tls_certificate, key=self.tls_key)
            context = await asyncio.to_thread(build_server_context, settings)  # TlsError names the file
            context.set_alpn_protocols(["http/1.1"])
            adapter = WorkerHandshakeTls(context)
        bound: list[socket.socket] = []
        try:
            for host, port in self.wanted:
                bound.append(net.bind(host, port, unix_mode=self.unix_mode))
        except BaseException:
            for sock in bound:
                sock.close()
            raise
        for sock in self.inherited + bound:
            server = _Server(sock, self.app, self.threads)
            server.ssl_adapter = adapter
            await asyncio.to_thread(server.prepare)  # starts its worker threads
            thread = threading.Thread(target=server.serve, name=f"admin-http-{len(self._servers)}", daemon=True)
            thread.start()
            self._servers.append(server)
            self._threads.append(thread)

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish (up to SHUTDOWN_TIMEOUT), join the threads."""
        servers, threads = self._servers, self._threads
        self._servers, self._threads = [], []

        def stop_all() -> None:
            for server in servers:
                server.stop()
            for thread in threads:
                thread.join(SHUTDOWN_TIMEOUT)

        await asyncio.to_thread(stop_all)
        for server in servers:
            net.remove_socket_file(server._bound)  # a Unix socket file this process made
