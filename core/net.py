"""Listening sockets: E-MailRelay's ``--interface`` list turned into bound sockets.

Sockets are bound before the daemon detaches, so "address in use" reaches the shell that
started it (exit code 2, as E-MailRelay does). Besides addresses and interface names an item may
be ``fd#N``, a listening socket inherited from the parent process, or an absolute path, a Unix
socket (E-MailRelay's forms).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import os
import socket
import stat
import struct
from pathlib import Path

SIOCGIFADDR = 0x8915
LISTEN_BACKLOG = 1024
INHERITED_PREFIX = "fd#"
DEFAULT_UNIX_MODE = 0o660  # [server] unix_socket_mode: the relay's user and group may connect


class BindError(OSError):
    """A listening address could not be bound (exit code 2)."""


def addresses_for(kind: str, interface_list: list[str], *, any_default: bool) -> list[str]:
    """Addresses to listen on for ``kind`` (``smtp``, ``pop``, ``admin``) from ``--interface``.

    An item ``kind=ADDR`` applies to that listener only, a bare item to all of them; an item may
    be an IP address, an interface name (``eth0``, ``lo-ipv4``), ``fd#N`` or a Unix socket path
    (both returned as they are). With no items: every address when remote clients are allowed,
    else loopback only; the same when every item names another listener (``--interface pop=ADDR``
    alone leaves SMTP on its default, as in E-MailRelay).
    """
    items: list[str] = []
    for item in interface_list:
        prefix, sep, value = item.partition("=")
        if sep:
            if prefix not in ("smtp", "pop", "admin"):
                raise ValueError(f"--interface {item!r}: unknown listener {prefix!r} (smtp, pop or admin)")
            if prefix == kind:
                items.append(value)
        else:
            items.append(item)
    if not items:  # none given, or only items for other listeners: this one keeps the default
        return ["0.0.0.0", "::"] if any_default else ["127.0.0.1"]
    out: list[str] = []
    for item in items:
        out += _expand(item)
    return list(dict.fromkeys(out))


def _expand(item: str) -> list[str]:
    if item.startswith(("/", INHERITED_PREFIX)):  # a Unix socket path or an inherited socket: as is
        return [item]
    try:
        ipaddress.ip_address(item.split("%")[0])
        return [item]
    except ValueError:
        pass
    name, family = item, None
    for suffix, fam in (("-ipv4", 4), ("-ipv6", 6)):
        if item.endswith(suffix):
            name, family = item[: -len(suffix)], fam
    found = (_ipv4_of(name) if family in (None, 4) else []) + (_ipv6_of(name) if family in (None, 6) else [])
    if not found:
        raise ValueError(f"--interface {item!r} is neither an IP address nor an interface with an address")
    return found


def _ipv4_of(name: str) -> list[str]:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            req = struct.pack("256s", name.encode()[:15])
            return [socket.inet_ntoa(fcntl.ioctl(s.fileno(), SIOCGIFADDR, req)[20:24])]
    except OSError:
        return []


def _ipv6_of(name: str) -> list[str]:
    out = []
    try:
        lines = Path("/proc/net/if_inet6").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        parts = line.split()
        if len(parts) >= 6 and parts[5] == name:
            addr = str(ipaddress.IPv6Address(bytes.fromhex(parts[0])))
            out.append(f"{addr}%{name}" if addr.startswith("fe80") else addr)
    return out


def bind(address: str, port: int, *, unix_mode: int = DEFAULT_UNIX_MODE) -> socket.socket:
    """A non-blocking listening socket for one ``--interface`` item: ``fd#N`` (inherited; ``port``
    unused), an absolute path (a Unix socket with permissions ``unix_mode``; ``port`` unused), or
    an IP address, bound with ``port``."""
    if address.startswith(INHERITED_PREFIX):
        number = address[len(INHERITED_PREFIX):]
        if not number.isdigit():
            raise ValueError(f"--interface {address!r}: expected fd#NUMBER")
        return adopt(int(number), f"--interface {address}")
    if address.startswith("/"):
        return bind_unix(address, unix_mode)
    host = address.split("%")[0]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            info = socket.getaddrinfo(address, port, family, socket.SOCK_STREAM)[0][4]
            sock.bind(info)
        else:
            sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise BindError(e.errno, f"cannot listen on {address} port {port}: {e.strerror}") from None
    return sock


def adopt(fd: int, what: str) -> socket.socket:
    """The listening stream socket on inherited descriptor ``fd``, non-blocking and
    close-on-exec; ValueError naming ``what`` if ``fd`` is anything else."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as e:
        raise ValueError(f"{what}: file descriptor {fd} is not an open socket ({e.strerror})") from None
    try:
        listening = sock.type == socket.SOCK_STREAM and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError:
        listening = False
    if not listening:
        sock.detach()  # not ours to close
        raise ValueError(f"{what}: file descriptor {fd} is not a listening stream socket")
    sock.set_inheritable(False)  # filters and other children must not hold the listener open
    sock.setblocking(False)
    return sock


class UnixListener(socket.socket):
    """A Unix listening socket this process created, with the file it made: removed on shutdown
    by :func:`remove_socket_file`, and only while that path is still this socket."""

    path: str = ""
    file_id: tuple[int, int] = (0, 0)  # (st_dev, st_ino) of the socket file


def bind_unix(path: str, mode: int = DEFAULT_UNIX_MODE) -> UnixListener:
    """A non-blocking listening Unix socket at ``path`` with permissions ``mode``.

    A socket file left by a process that died (nobody accepts on it) is replaced; a live one, or
    a file that is not a socket, is a :class:`BindError`. Permissions are set before ``listen``,
    and until then a connection attempt is refused, so no client gets in under looser ones.
    """
    try:
        existing = os.lstat(path)
    except FileNotFoundError:
        existing = None
    except OSError as e:
        raise BindError(e.errno, f"cannot listen on {path}: {e.strerror}") from None
    if existing is not None:
        if not stat.S_ISSOCK(existing.st_mode):
            raise BindError(errno.EEXIST, f"cannot listen on {path}: it exists and is not a socket")
        _remove_stale(path)
    sock = UnixListener(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
    except OSError as e:
        sock.close()
        raise BindError(e.errno, f"cannot listen on {path}: {e.strerror or e}") from None
    try:
        os.chmod(path, mode)
        st = os.stat(path)
        sock.path, sock.file_id = path, (st.st_dev, st.st_ino)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(path)  # the file this call just made
        raise BindError(e.errno, f"cannot listen on {path}: {e.strerror or e}") from None
    return sock


def _remove_stale(path: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            pass  # nobody is listening: the socket is left over
        except OSError as e:
            raise BindError(e.errno or errno.EADDRINUSE, f"cannot listen on {path}: cannot tell "
                            f"whether another process uses it ({e.strerror or e})") from None
        else:
            raise BindError(errno.EADDRINUSE, f"cannot listen on {path}: another process is listening there")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise BindError(e.errno, f"cannot listen on {path}: cannot remove the old socket: {e.strerror}") from None


def remove_socket_file(sock: socket.socket) -> None:
    """Remove the file of a :class:`UnixListener` if it is still that socket's; anything else
    (TCP, inherited sockets, whose files belong to the service manager) is left alone."""
    if not isinstance(sock, UnixListener) or not sock.path:
        return
    try:
        st = os.lstat(sock.path)
        if (st.st_dev, st.st_ino) == sock.file_id:
            os.unlink(sock.path)
    except OSError:
        pass


def client_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A peer address as an ``ipaddress`` object (zone removed, IPv4-mapped unwrapped); None for
    a peer without an IP address (a Unix socket) or text that is not an address."""
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def in_networks(peer_ip: str, networks: "tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]") -> bool:
    """Is ``peer_ip`` in one of ``networks``? No address at all (a Unix-socket client, a message
    the relay made itself) counts as 127.0.0.1."""
    address = client_address(peer_ip or "127.0.0.1")
    return address is not None and any(address in network for network in networks)


def is_inet(sock: socket.socket) -> bool:
    return sock.family in (socket.AF_INET, socket.AF_INET6)


def describe(sock: socket.socket) -> str:
    """``host:port``, ``[v6]:port``, or a Unix socket's path (``@name`` in the abstract namespace)."""
    if isinstance(sock, UnixListener) and sock.path:
        return sock.path
    addr = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        if isinstance(addr, bytes):
            return "@" + addr[1:].decode(errors="replace") if addr[:1] == b"\0" else addr.decode(errors="replace")
        return addr or "unix"
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
