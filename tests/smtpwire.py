"""A byte-exact SMTP client for tests that need to send what real clients would not."""

from __future__ import annotations

import socket


class Wire:
    """Raw SMTP over a socket: send exact bytes, read complete (multi-line) replies."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0):
        self.sock = socket.create_connection((host, port), timeout)
        self.buf = b""

    def reply(self) -> tuple[int, str]:
        """The next complete reply: (code, text of all lines joined by newlines)."""
        lines = []
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"connection closed; partial reply {self.buf!r}, lines {lines}")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            text = line.decode("utf-8", "replace")
            lines.append(text[4:])
            if len(text) < 4 or text[3] != "-":
                return int(text[:3]), "\n".join(lines)

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def cmd(self, line: str | bytes) -> tuple[int, str]:
        """Send one command line (CRLF added) and return its reply."""
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.reply()

    def greet(self, name: str = "client.test") -> tuple[int, str]:
        code, _ = self.reply()
        assert code == 220, code
        return self.cmd(f"EHLO {name}")

    def closed(self, timeout: float = 5.0) -> bool:
        """True when the server has closed the connection (EOF)."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, socket.timeout):
            return False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Wire":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
