"""systemd without a dependency: socket activation and readiness notification.

Socket activation follows sd_listen_fds(3): the service manager passes listening sockets as file
descriptors 3, 4, ... and says so in ``LISTEN_FDS`` (how many), ``LISTEN_PID`` (for which process:
a variable inherited by some other process means nothing) and ``LISTEN_FDNAMES`` (colon-separated
names, from ``FileDescriptorName=``). The variables are removed once read so that filters and
other children do not believe the sockets are theirs, and the descriptors are made
close-on-exec for the same reason.

Readiness follows sd_notify(3): ``READY=1``, ``STOPPING=1`` and ``STATUS=...`` datagrams to the
Unix socket named by ``NOTIFY_SOCKET`` (a path, or ``@name`` in the abstract namespace).
"""

from __future__ import annotations

import logging
import os
import socket
from typing import MutableMapping

from . import net

log = logging.getLogger("mailrelay")

SD_LISTEN_FDS_START = 3
UNNAMED = "unknown"  # the name sd_listen_fds_with_names(3) gives when LISTEN_FDNAMES is absent
LISTENER_NAMES = ("smtp", "submission", "pop", "admin")  # FileDescriptorName= values the relay serves
_LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def listen_fds(environ: MutableMapping[str, str] | None = None, *, pid: int | None = None,
               unset_environment: bool = True) -> list[tuple[str, int]]:
    """``(name, fd)`` for each socket the service manager passed to this process; empty when none.

    Raises ValueError when the variables are malformed (a broken unit, not something to ignore).
    """
    env = os.environ if environ is None else environ
    values = {key: env.get(key) for key in _LISTEN_VARIABLES}
    if unset_environment:
        for key in _LISTEN_VARIABLES:
            env.pop(key, None)
    listen_pid, count, names = values["LISTEN_PID"], values["LISTEN_FDS"], values["LISTEN_FDNAMES"]
    if not listen_pid or not count:
        return []
    if not listen_pid.isdigit() or int(listen_pid) != (os.getpid() if pid is None else pid):
        return []  # meant for another process (a parent that did not unset them)
    if not count.isdigit():
        raise ValueError(f"socket activation: LISTEN_FDS={count!r} is not a number")
    n = int(count)
    labels = names.split(":") if names is not None else [UNNAMED] * n
    if len(labels) != n:
        raise ValueError(f"socket activation: LISTEN_FDNAMES names {len(labels)} socket(s) but "
                         f"LISTEN_FDS={n}")
    passed = [(label, SD_LISTEN_FDS_START + i) for i, label in enumerate(labels)]
    for _, fd in passed:
        try:
            os.set_inheritable(fd, False)
        except OSError as e:
            raise ValueError(f"socket activation: file descriptor {fd} (LISTEN_FDS={n}) is not open: "
                             f"{e.strerror}") from None
    return passed


def activated_sockets(environ: MutableMapping[str, str] | None = None, *,
                      pid: int | None = None) -> dict[str, list[socket.socket]]:
    """The sockets of socket activation by listener name (:data:`LISTENER_NAMES`), ready to serve.

    ``smtp`` and ``submission`` are SMTP listeners, ``pop`` the POP3 server's, ``admin`` the admin
    server's. A socket without a name is SMTP: systemd then names it after its unit
    (``relay.socket``), or ``unknown`` without ``LISTEN_FDNAMES``. Any other name is a ValueError,
    as is a descriptor that is not a listening stream socket.
    """
    grouped: dict[str, list[socket.socket]] = {}
    for name, fd in listen_fds(environ, pid=pid):
        kind = "smtp" if name == UNNAMED or name.endswith(".socket") else name
        if kind not in LISTENER_NAMES:
            raise ValueError(f"socket activation: unknown socket name {name!r} in LISTEN_FDNAMES "
                             f"(FileDescriptorName= must be one of {', '.join(LISTENER_NAMES)})")
        grouped.setdefault(kind, []).append(net.adopt(fd, f"socket activation ({name}, fd {fd})"))
    return grouped


def _notify_address(value: str) -> str | bytes:
    if value.startswith("@"):  # the abstract namespace: a leading NUL instead of the '@'
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    raise ValueError(f"NOTIFY_SOCKET={value!r}: expected an absolute path or @abstract-name")


class Notifier:
    """Tells the service manager how the daemon is doing; does nothing without ``NOTIFY_SOCKET``.

    Sending never blocks: a datagram the manager cannot take at once is dropped (and logged).
    """

    def __init__(self, address: str | None):
        self.address = address
        self._warned = False

    @classmethod
    def from_environment(cls, environ: MutableMapping[str, str] | None = None) -> Notifier:
        """The notifier for ``NOTIFY_SOCKET``, which is removed from the environment so that
        children (filters) cannot speak for the daemon."""
        env = os.environ if environ is None else environ
        return cls(env.pop("NOTIFY_SOCKET", None) or None)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` lines in one datagram; True when sent."""
        if self.address is None:
            return False
        payload = "\n".join(a.replace("\n", " ") for a in assignments).encode()
        try:
            address = _notify_address(self.address)
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sock.sendto(payload, address)
        except (OSError, ValueError) as e:
            if not self._warned:  # once: a missing manager should not fill the log
                log.warning("systemd notification failed (NOTIFY_SOCKET=%s): %s", self.address, e)
                self._warned = True
            return False
        return True

    def ready(self, status: str = "") -> bool:
        """The listeners accept connections."""
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def stopping(self, status: str = "") -> bool:
        """Shutdown has begun."""
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        """A line for ``systemctl status``."""
        return self.notify(f"STATUS={text}")
