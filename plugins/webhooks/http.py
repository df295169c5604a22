"""A deliberately small HTTP/1.1 client: one POST per connection, over asyncio streams.

A webhook needs one request and the status code of its answer, nothing more; a client library
would add a dependency (and for httpx, anyio and its own CA bundle) for that. ``Connection: close``
keeps the protocol to its simplest part: no keep-alive, no chunked bodies to parse, the response
body is never read. HTTPS verifies the certificate and the host name, against the system's trust
store or ``ca_file``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import ssl
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

MAX_HEADER_LINE = 8192
MAX_HEADERS = 100
_STATUS = re.compile(rb"HTTP/1\.[01] ([1-5]\d\d)(?: ([^\r\n]*))?\r?\n")


class HttpError(Exception):
    """No usable answer: could not connect, TLS failed, timed out, or the reply was not HTTP."""


@dataclass(frozen=True)
class Endpoint:
    """Where and how to POST: parsed once from the configured URL."""

    url: str
    https: bool
    host: str
    port: int
    target: str                # path and query, as sent in the request line
    authorization: str = ""    # "Basic ..." from user:password@ in the URL

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.https else 80
        return host if self.port == default else f"{host}:{self.port}"

    @property
    def redacted(self) -> str:
        """The URL for logs: scheme and host only (paths and queries often hold tokens)."""
        scheme = "https" if self.https else "http"
        return f"{scheme}://{self.host_header}/..."


def parse_url(url: str) -> Endpoint:
    """An :class:`Endpoint` from an ``http(s)://`` URL (already checked by the settings)."""
    parts = urlsplit(url)
    https = parts.scheme == "https"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    authorization = ""
    if parts.username is not None:
        credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        authorization = "Basic " + base64.b64encode(credentials.encode()).decode()
    assert parts.hostname is not None
    return Endpoint(url, https, parts.hostname, parts.port or (443 if https else 80), target, authorization)


def tls_context(ca_file: str = "") -> ssl.SSLContext:
    """Certificate and host name verification, against ``ca_file`` if given (blocking: loads files)."""
    return ssl.create_default_context(cafile=ca_file or None)


@dataclass(frozen=True)
class Response:
    status: int
    reason: str
    headers: dict[str, str] = field(default_factory=dict)  # names in lower case


async def post(endpoint: Endpoint, body: bytes, headers: dict[str, str], *, timeout: float,
               tls: ssl.SSLContext | None) -> Response:
    """POST ``body``; the final response's status line and headers. Raises :class:`HttpError`."""
    lines = [f"POST {endpoint.target} HTTP/1.1", f"Host: {endpoint.host_header}",
             f"Content-Length: {len(body)}", "Connection: close"]
    if endpoint.authorization:
        lines.append(f"Authorization: {endpoint.authorization}")
    lines += [f"{name}: {value}" for name, value in headers.items()]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                endpoint.host, endpoint.port, ssl=tls if endpoint.https else None,
                server_hostname=endpoint.host if endpoint.https else None, limit=MAX_HEADER_LINE)
            writer.write(request)
            await writer.drain()
            while True:
                response = await _read_head(reader)
                if response.status >= 200:  # 1xx (100 Continue) are interim answers
                    return response
    except TimeoutError:
        raise HttpError(f"no answer within {timeout:g}s") from None
    except ssl.SSLCertVerificationError as e:
        raise HttpError(f"TLS: certificate verify failed: {e.verify_message}") from None
    except ssl.SSLError as e:
        raise HttpError(f"TLS: {e.reason or e}") from None
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
        raise HttpError(f"{type(e).__name__}: {e}") from None
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                # A TLS peer that never answers the close_notify must not hold the sender up.
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()


async def _read_head(reader: asyncio.StreamReader) -> Response:
    status_line = await reader.readline()
    if not status_line:
        raise HttpError("the connection was closed without an answer")
    m = _STATUS.fullmatch(status_line)
    if m is None:
        raise HttpError(f"not an HTTP/1.x status line: {status_line[:80]!r}")
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADERS + 1):
        line = await reader.readline()
        if not line.endswith(b"\n"):
            raise HttpError("connection closed in the response headers")
        if line in (b"\r\n", b"\n"):
            reason = (m.group(2) or b"").decode("latin-1")
            return Response(int(m.group(1)), reason, headers)
        name, sep, value = line.decode("latin-1").partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    raise HttpError(f"more than {MAX_HEADERS} response headers")
