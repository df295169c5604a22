"""Running the relay as a process: detaching like E-MailRelay, the pid file, signals, the event loop.

Start-up order follows E-MailRelay: bind the listening sockets and check the spool directory
*before* detaching (so "address in use" reaches the shell as exit code 2), fork twice, write the
pid file from the final process, then run. The first parent waits for the daemon to report that
it is serving (or why it is not) before it exits.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import pwd
import signal
import stat
import sys
from pathlib import Path
from typing import Callable, TextIO

from . import __version__, logs, systemd
from .config.settings import Settings
from .net import BindError
from .plugin_host import PluginHost
from .relay import Relay

log = logging.getLogger("mailrelay")

EXIT_OK, EXIT_ERROR, EXIT_BIND = 0, 1, 2


def _absolute_paths(settings: Settings) -> None:
    # The daemon changes directory to "/": resolve relative paths against the start directory.
    settings.spool.dir = os.path.abspath(settings.spool.dir)
    if settings.config_file:  # the admin API edits the file the daemon was started with
        settings.config_file = os.path.abspath(settings.config_file)
    if settings.server.pid_file:
        settings.server.pid_file = os.path.abspath(settings.server.pid_file)
    if settings.log.file:
        settings.log.file = os.path.abspath(settings.log.file)


def _check_spool_dir(path: str, user: pwd.struct_passwd | None = None) -> None:
    created = not os.path.exists(path)
    os.makedirs(path, mode=0o770, exist_ok=True)
    if user is not None:
        if created:  # ours: it belongs to the user the relay will run as
            os.chown(path, user.pw_uid, user.pw_gid)
        if not _writable_by(path, user):
            raise PermissionError(f"spool directory {path} is not writable by user {user.pw_name} (--user): "
                                  f"chown {user.pw_name} {path}")
    elif not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(f"spool directory {path} is not writable")


# ---------------------------------------------------------------- --user
def _run_as(settings: Settings) -> pwd.struct_passwd | None:
    """The account ``--user`` names, when there is a switch to make (started as root, not ``root``)."""
    name = settings.server.user
    if not name or name == "root":  # E-MailRelay: --user root disables switching
        return None
    try:
        user = pwd.getpwnam(name)
    except KeyError:
        raise ValueError(f"--user {name}: no such user") from None
    if os.geteuid() != 0:
        if os.geteuid() != user.pw_uid:
            log.warning("--user %s ignored: not started as root", name)
        return None
    if user.pw_uid == 0:
        return None
    return user


def _writable_by(path: str, user: pwd.struct_passwd) -> bool:
    """Whether ``user`` may create files in directory ``path``: it can search every directory on
    the way and write this one (mode bits; ACLs are not read)."""
    groups = set(os.getgrouplist(user.pw_name, user.pw_gid))

    def allowed(directory: str, write: bool) -> bool:
        st = os.stat(directory)
        if st.st_uid == user.pw_uid:
            shift = 6
        elif st.st_gid in groups:
            shift = 3
        else:
            shift = 0
        need = (stat.S_IXOTH | (stat.S_IWOTH if write else 0)) << shift
        return st.st_mode & need == need

    path = os.path.abspath(path)
    return allowed(path, True) and all(allowed(str(p), False) for p in Path(path).parents)


def _drop_privileges(user: pwd.struct_passwd | None, spool_dir: str) -> None:
    """Become ``user`` for good: groups, then group, then user (the order that leaves no way back).
    Everything that needs root (binding low ports, reading keys, the pid file) is done by now."""
    if user is None:
        return
    os.initgroups(user.pw_name, user.pw_gid)
    os.setgid(user.pw_gid)
    os.setuid(user.pw_uid)
    if os.getuid() != user.pw_uid or os.geteuid() != user.pw_uid:  # never carry on as root
        raise PermissionError(f"--user {user.pw_name}: could not switch user")
    if not os.access(spool_dir, os.W_OK | os.X_OK):
        raise PermissionError(f"spool directory {spool_dir} is not writable by user {user.pw_name} (--user)")
    log.info("running as user %s (uid %d, gid %d)", user.pw_name, user.pw_uid, user.pw_gid)


def banner(relay: Relay, pid: int) -> str:
    listen = ", ".join(relay.smtp_addresses) or "(SMTP disabled)"
    return (f"mailrelay {__version__}: SMTP on {listen}; spool {relay.spool.directory}; pid {pid}"
            f" (stop with: kill {pid})")


def run(settings: Settings, plugins: PluginHost, out: TextIO = sys.stdout) -> int:
    """Run until SIGTERM/SIGINT; return the process exit code."""
    _absolute_paths(settings)
    logs.configure(settings.log)
    if settings.server.localedir:
        log.debug("--localedir %s ignored: messages are not translated", settings.server.localedir)
    notifier = systemd.Notifier.from_environment()  # used in the foreground only (Type=notify)
    try:
        user = _run_as(settings)
        relay = Relay(settings, plugins, inherited=systemd.activated_sockets())
        _check_spool_dir(settings.spool.dir, user)
        relay.bind()
    except BindError as e:
        print(f"relay: error: {e.strerror}", file=sys.stderr)
        return EXIT_BIND
    except (OSError, ValueError) as e:
        print(f"relay: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    if settings.queue.as_client:
        return _run_client(relay, out, user)
    if not settings.server.daemon:
        return _serve(relay, settings, report=lambda msg: print(msg, file=out, flush=True), notifier=notifier,
                      user=user)
    return _detach_and_serve(relay, settings, out, user)


def _detach_and_serve(relay: Relay, settings: Settings, out: TextIO, user: pwd.struct_passwd | None) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    read_fd, write_fd = os.pipe()
    if os.fork() > 0:  # the starting process: wait for the daemon's word
        os.close(write_fd)
        relay.close_sockets()
        with os.fdopen(read_fd, "r") as pipe:
            status = pipe.read()
        if status.startswith("ok "):
            print(status[3:].strip(), file=out, flush=True)
            return EXIT_OK
        if status.startswith("logged "):
            return EXIT_ERROR
        print(f"relay: error: {status.strip() or 'the daemon exited during start-up'}", file=sys.stderr)
        return EXIT_ERROR
    os.close(read_fd)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)
    logs.configure(settings.log)  # re-open handlers in this process (syslog socket, files)
    reporter = os.fdopen(write_fd, "w")

    def report(message: str) -> None:
        reporter.write(message)
        reporter.close()

    code = _serve(relay, settings, report=lambda msg: report("ok " + msg), on_error=report, user=user)
    os._exit(code)


def _close_stderr(settings: Settings) -> None:
    if settings.log.enabled and not settings.log.file and not (settings.log.syslog
                                                               and os.path.exists(settings.log.syslog_address)):
        log.warning("logging stops here: --close-stderr closes the standard error stream and there is "
                    "no --log-file or syslog")
    fd = os.open(os.devnull, os.O_WRONLY)
    os.dup2(fd, 2)
    os.close(fd)


def _run_client(relay: Relay, out: TextIO, user: pwd.struct_passwd | None = None) -> int:
    """``--as-client``: forward everything in the spool once; exit 1 if anything is left or failed."""

    async def once() -> int:
        await relay.start()
        _drop_privileges(user, str(relay.spool.directory))
        try:
            summary = await relay.forward_once()
        finally:
            await relay.stop()
        print(f"mailrelay: forwarded {len(summary.ids)} message(s): {summary.delivered} delivered, "
              f"{summary.deferred} deferred, {summary.failed} failed", file=out, flush=True)
        return EXIT_OK if summary.ok else EXIT_ERROR

    try:
        with asyncio.Runner(loop_factory=_event_loop_factory()) as runner:
            return runner.run(once())
    except Exception as e:
        print(f"relay: error: {e}", file=sys.stderr)
        return EXIT_ERROR


def _event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop  # optional extra: mailrelay[speed]
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def _serve(relay: Relay, settings: Settings, report: Callable[[str], None],
           on_error: Callable[[str], None] | None = None, notifier: systemd.Notifier | None = None,
           user: pwd.struct_passwd | None = None) -> int:
    with asyncio.Runner(loop_factory=_event_loop_factory()) as runner:
        return runner.run(_main(relay, settings, report, on_error, notifier or systemd.Notifier(None), user))


async def _reload(relay: Relay) -> None:
    """SIGHUP: re-read what can change without a restart (the TLS certificate)."""
    if relay.smtp is None or relay.smtp.tls is None:
        log.info("SIGHUP: nothing to reload")
        return
    log.info("SIGHUP: reloading the TLS certificate")
    await relay.smtp.reload_tls()


async def _main(relay: Relay, settings: Settings, report: Callable[[str], None],
                on_error: Callable[[str], None] | None, notifier: systemd.Notifier,
                user: pwd.struct_passwd | None = None) -> int:
    loop = asyncio.get_running_loop()
    pid_file = settings.server.pid_file
    started = False
    # Before start(): a SIGTERM while plugins start up waits for them, then shuts down cleanly
    # (listeners closed, Unix socket files removed) instead of killing the process half-started.
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await relay.start()
        started = True
        if pid_file:  # as root still: /run is root's
            Path(pid_file).parent.mkdir(parents=True, exist_ok=True)
            Path(pid_file).write_text(f"{os.getpid()}\n")
        _drop_privileges(user, str(relay.spool.directory))
    except Exception as e:
        if started:
            await relay.stop()
        log.error("start-up failed: %s", e)
        notifier.status(f"start-up failed: {e}")
        if on_error is not None:
            # "logged": the log line above already reached the terminal; the parent stays quiet.
            on_error(("logged " if _logging_to_stderr() else "") + str(e))
        elif not _logging_to_stderr():
            print(f"relay: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    reloads: set[asyncio.Task[None]] = set()

    def hangup() -> None:
        task = loop.create_task(_reload(relay))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, hangup)
    report(banner(relay, os.getpid()))
    notifier.ready(status=f"SMTP on {', '.join(relay.smtp_addresses) or '(disabled)'}")
    if settings.log.close_stderr:
        _close_stderr(settings)
    # What start-up made (modules, plugins, settings: tens of thousands of objects) lives as long
    # as the process: keep it out of the collector's passes, which would walk it every few
    # thousand messages. Only cyclic garbage among these objects is never freed (a reload's).
    gc.freeze()
    await stop.wait()
    log.info("signal received: shutting down")
    notifier.stopping(status="shutting down")
    await asyncio.gather(*reloads, return_exceptions=True)
    await relay.stop()
    if pid_file:
        try:
            os.unlink(pid_file)
        except OSError:
            pass
    return EXIT_OK


def _logging_to_stderr() -> bool:
    """Whether log lines already reach stderr (the foreground with --log), so that a start-up
    error is not printed twice."""
    for logger in (logging.getLogger("mailrelay"), logging.getLogger()):
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) is sys.stderr:
                return True
    return False
