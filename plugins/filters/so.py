"""``filter-so``: compiled filters, shared libraries with the C ABI of ``filters_c/mailrelay_filter.h``.

* ``so:/path/libx.so`` or ``so:/path/libx.so;ARG`` (also ``so:isolated:...``): the library runs in
  a worker process that the relay supervises. A segfault, an abort or a call that overruns
  ``--filter-timeout`` costs that worker (killed, logged with the signal) and gives the message
  a temporary failure (451 before the 250, a retry at the client stage); the next message starts
  a fresh worker. The worker is kept between messages, and calls to it are serialized.
* ``so:inprocess:/path/libx.so;ARG``: loaded into the daemon, for speed when the operator trusts
  the code. Calls run on a thread of their own, never on the event loop. A crash takes the
  daemon down, and a call that never returns cannot be stopped (each later message gets 451).

At start-up the library must exist, export ``mailrelay_filter_abi_version`` with a version this
relay speaks, and accept its argument (``mailrelay_filter_init``); otherwise the relay does not
start. Isolated filters are checked in a throw-away worker, so even a crash there is only an error
message. The verdict's exit code means what an E-MailRelay filter's exit code means
(:func:`mailrelay.filtering.result_from_exit`), so rejects, abandon, rescan and stop-scanning work.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from mailrelay_sdk import FilterAction, FilterResult, Message, hookimpl

from mailrelay.filtering import FilterSpec, FilterSpecError, result_from_exit

from .program import envelope_environment, to_crlf
from .so_worker import FRAME, MAX_HEADER_FRAME, Answer, FilterLoadError, Library, encode_json

log = logging.getLogger("mailrelay.filters")

WORKER_MODULE = "mailrelay_plugins.filters.so_worker"
TEMPFAIL = "Temporary local problem, please try again later"
START_TIMEOUT = 20.0   # Python and cffi start-up plus the library's init, at least
STOP_GRACE = 5.0       # for mailrelay_filter_cleanup() at shutdown


@dataclass(frozen=True)
class SoSpec:
    """An ``so:`` spec taken apart: the library, its argument, and where it runs."""

    path: str
    argument: str
    inprocess: bool


def parse_so_spec(spec: FilterSpec) -> SoSpec:
    """``[inprocess:|isolated:]PATH[;ARG]``; the library must be an existing file."""
    rest, inprocess = spec.argument, False
    for mode in ("inprocess:", "isolated:"):
        if rest.startswith(mode):
            rest, inprocess = rest[len(mode):], mode == "inprocess:"
    path, _, argument = rest.partition(";")
    path = path.strip()
    if not path:
        raise FilterSpecError(f"filter {spec.text!r}: no library given (so:/path/libfilter.so[;argument])")
    resolved = Path(path).expanduser()
    if not resolved.is_absolute():  # never a search of the system's library directories
        resolved = Path.cwd() / resolved
    if not resolved.is_file():
        raise FilterSpecError(f"filter {spec.text!r}: {path} is not a file")
    return SoSpec(str(resolved), argument, inprocess)


def message_fields(message: Message, stage: str) -> dict[str, Any]:
    """The envelope fields of ``struct mailrelay_message`` (the content travels separately)."""
    env = envelope_environment(message)
    return {"spool_id": message.id, "stage": stage, "sender": message.envelope.sender,
            "recipients": [r.address for r in message.envelope.recipients], "client_ip": env["CLIENT_IP"],
            "helo": env["HELO"], "auth_user": env["AUTH_USER"], "message_id": env["MESSAGE_ID"],
            "content_path": str(message.content_path or ""), "envelope_path": str(message.envelope_path or "")}


def _one_line(text: str) -> str:
    # Inside <<...>> for parse_reason: no line breaks, and no early ">>".
    return " ".join(text.split()).replace(">>", "> >")


def verdict_result(answer: Answer, stage: Any, reject_code: int) -> FilterResult:
    """A filter's verdict in the relay's terms: its exit code as E-MailRelay would read it."""
    if answer.error:
        return FilterResult.fail(TEMPFAIL, 451, "4.3.0", reason=answer.error)
    if answer.status != 0:
        return FilterResult.fail(TEMPFAIL, 451, "4.3.0",
                                 reason=answer.reason or f"mailrelay_filter returned {answer.status}")
    if not 0 <= answer.exit_code <= 255:
        return FilterResult.fail(TEMPFAIL, 451, "4.3.0", reason=f"filter gave exit code {answer.exit_code}")
    code = answer.smtp_code if 400 <= answer.smtp_code <= 599 else 0
    output = f"<<{code} {_one_line(answer.text)}>>" if code else f"<<{_one_line(answer.text)}>>"
    if answer.reason:
        output += f"\n<<{_one_line(answer.reason)}>>"
    result = result_from_exit(answer.exit_code, stage, output, reject_code=reject_code)
    if answer.content is not None and answer.exit_code in (0, 101, 103) and result.action is FilterAction.OK:
        result = replace(result, content=to_crlf(answer.content))
    return result


def _tempfail(reason: str) -> FilterResult:
    return FilterResult.fail(TEMPFAIL, 451, "4.3.0", reason=reason)


def describe_exit(returncode: int | None) -> str:
    """``killed by signal SIGSEGV`` / ``exited with status 3``."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


# ---------------------------------------------------------------- isolated: a supervised worker
class WorkerError(Exception):
    """The worker could not be started or broke the protocol."""


class _Worker:
    """One running worker process and its pipes."""

    def __init__(self, proc: asyncio.subprocess.Process, max_output: int):
        self.proc = proc
        self.pid = proc.pid
        self.max_output = max_output
        assert proc.stdin is not None and proc.stdout is not None
        self.writer, self.reader = proc.stdin, proc.stdout

    @classmethod
    async def start(cls, hello: bytes, max_output: int) -> "_Worker":
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", WORKER_MODULE, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            start_new_session=True)  # its own process group: killed as a whole, spared the terminal's ^C
        worker = cls(proc, max_output)
        try:
            worker.writer.write(hello)
            await worker.writer.drain()
            answer = json.loads(await worker._frame(MAX_HEADER_FRAME))
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            worker.kill()
            raise WorkerError(f"worker pid={worker.pid} {describe_exit(await proc.wait())} while starting") from e
        except BaseException:
            worker.kill()
            raise
        if not answer.get("ok"):
            worker.kill()
            raise WorkerError(answer.get("error") or "worker refused to start")
        return worker

    async def _frame(self, limit: int) -> bytes:
        (size,) = FRAME.unpack(await self.reader.readexactly(FRAME.size))
        if size > limit:
            raise WorkerError(f"worker sent a frame of {size} bytes (limit {limit})")
        return await self.reader.readexactly(size)

    async def request(self, fields: dict[str, Any], content: bytes) -> Answer:
        """One message through the worker; EOF or a broken pipe means it died."""
        head = encode_json(fields) + FRAME.pack(len(content))
        if len(content) <= 1 << 16:  # one write(2) for the usual message; no copy of big ones
            self.writer.write(head + content)
        else:
            self.writer.write(head)
            self.writer.write(content)
        await self.writer.drain()
        try:
            got = json.loads(await self._frame(MAX_HEADER_FRAME))
            body = await self._frame(self.max_output)
            return Answer(int(got["status"]), int(got["exit_code"]), int(got["smtp_code"]), str(got["text"]),
                          str(got["reason"]), body if got["has_content"] else None, str(got.get("error", "")))
        except (ValueError, KeyError, TypeError) as e:
            raise WorkerError(f"worker pid={self.pid} sent a bad answer: {e}") from None

    def kill(self) -> None:
        """SIGKILL to the worker's process group (anything the filter forked goes too)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()

    async def reap(self) -> int:
        """Its exit status, killing it if it does not end by itself within a moment."""
        try:
            return await asyncio.wait_for(self.proc.wait(), 2.0)
        except TimeoutError:
            self.kill()
            return await self.proc.wait()


class IsolatedSoFilter:
    """``so:/path/libx.so;ARG``: one supervised worker, reused for every message, restarted when it dies."""

    def __init__(self, spec: FilterSpec, so: SoSpec, reject_code: int = 550, max_output: int = 1 << 30):
        self.name = "so:" + os.path.basename(so.path)
        self.timeout = spec.timeout
        self.reject_code = reject_code
        self.max_output = max_output
        self._hello = encode_json({"path": so.path, "argument": so.argument, "max_output": max_output})
        self._worker: _Worker | None = None
        self._lock = asyncio.Lock()
        self._closed = False
        self._check(spec.text)

    def _check(self, text: str) -> None:
        """Start-up: load and init the library once in a throw-away worker (before anything listens)."""
        limit = max(self.timeout, START_TIMEOUT)
        try:
            run = subprocess.run([sys.executable, "-m", WORKER_MODULE], input=self._hello, capture_output=True,
                                 timeout=limit, start_new_session=True)
        except subprocess.TimeoutExpired:
            raise FilterSpecError(f"filter {text!r}: the library did not finish its init within {limit:g}s") from None
        answer: dict[str, Any] = {}
        if len(run.stdout) > FRAME.size:
            with contextlib.suppress(ValueError):
                answer = json.loads(run.stdout[FRAME.size:FRAME.size + FRAME.unpack(run.stdout[:FRAME.size])[0]])
        if answer.get("ok") and run.returncode == 0:
            return
        detail = answer.get("error")
        if not detail:
            stderr = run.stderr.decode("utf-8", "replace").strip()[-500:]
            detail = f"the start-up check of the library failed: its worker {describe_exit(run.returncode)}" + (
                f": {stderr}" if stderr else "")
        raise FilterSpecError(f"filter {text!r}: {detail}")

    async def __call__(self, message: Message, stage: Any) -> FilterResult:
        fields = message_fields(message, stage)
        async with self._lock:
            if self._closed:
                return _tempfail("relay is stopping")
            try:
                worker = await self._ready_worker()
            except TimeoutError:
                log.error("id=%s filter=%s: a new worker did not start within %gs", message.id, self.name,
                          max(self.timeout, START_TIMEOUT))
                return _tempfail("filter worker did not start in time")
            except (WorkerError, OSError) as e:
                log.error("id=%s filter=%s cannot start a worker: %s", message.id, self.name, e)
                return _tempfail(f"filter worker did not start: {e}")
            try:
                async with asyncio.timeout(self.timeout):
                    answer = await worker.request(fields, message.content)
            except TimeoutError:
                self._forget(worker).kill()
                log.error("id=%s filter=%s gave no answer within %gs: worker pid=%d killed; a new worker "
                          "starts with the next message", message.id, self.name, self.timeout, worker.pid)
                return _tempfail(f"filter timed out after {self.timeout:g}s")
            except (asyncio.IncompleteReadError, ConnectionError):
                status = await self._forget(worker).reap()
                log.error("id=%s filter=%s worker pid=%d %s; the message is kept for a retry and a new worker "
                          "starts with the next message", message.id, self.name, worker.pid, describe_exit(status))
                return _tempfail(f"filter worker {describe_exit(status)}")
            except WorkerError as e:
                self._forget(worker).kill()
                log.error("id=%s filter=%s %s; worker killed", message.id, self.name, e)
                return _tempfail(str(e))
            except BaseException:  # cancelled mid-conversation: the pipe is out of step, start afresh
                self._forget(worker).kill()
                raise
        return verdict_result(answer, stage, self.reject_code)  # the chain logs refusals with their reason

    async def _ready_worker(self) -> _Worker:
        worker = self._worker
        if worker is not None and worker.proc.returncode is not None:
            log.error("filter=%s worker pid=%d %s while idle", self.name, worker.pid,
                      describe_exit(worker.proc.returncode))
            worker = self._worker = None
        if worker is None:
            worker = await asyncio.wait_for(_Worker.start(self._hello, self.max_output),
                                            max(self.timeout, START_TIMEOUT))
            log.info("filter=%s worker pid=%d started", self.name, worker.pid)
            self._worker = worker
        return worker

    def _forget(self, worker: _Worker) -> _Worker:
        if self._worker is worker:
            self._worker = None
        return worker

    async def aclose(self) -> None:
        """End the worker: end of input lets it run mailrelay_filter_cleanup(); then SIGKILL."""
        self._closed = True
        worker, self._worker = self._worker, None
        if worker is None:
            return
        with contextlib.suppress(OSError):
            worker.writer.close()
        try:
            await asyncio.wait_for(worker.proc.wait(), STOP_GRACE)
        except TimeoutError:
            log.warning("filter=%s worker pid=%d did not stop within %gs; killed", self.name, worker.pid, STOP_GRACE)
            worker.kill()
            await worker.proc.wait()


# ---------------------------------------------------------------- in-process
class _CallThread:
    """The one thread that makes an in-process library's calls. A daemon thread, not the default
    executor, so that a call that never returns neither holds an executor slot nor blocks exit."""

    def __init__(self, name: str):
        self.name = name
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._pid = 0  # started on first use, and again in a forked child (threads do not survive fork)

    def submit(self, function: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._jobs = queue.SimpleQueue()
            threading.Thread(target=self._run, args=(self._jobs,), name=self.name, daemon=True).start()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._jobs.put((loop, future, function, args))
        return future

    def stop(self) -> None:
        self._jobs.put(None)

    @staticmethod
    def _run(jobs: queue.SimpleQueue[Any]) -> None:
        while (job := jobs.get()) is not None:
            loop, future, function, args = job
            try:
                outcome: tuple[Any, BaseException | None] = (function(*args), None)
            except BaseException as e:  # handed to the awaiting coroutine
                outcome = (None, e)
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
                loop.call_soon_threadsafe(_settle, future, *outcome)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class InProcessSoFilter:
    """``so:inprocess:/path/libx.so;ARG``: the library in the daemon, called on its own thread."""

    def __init__(self, spec: FilterSpec, so: SoSpec, reject_code: int = 550, max_output: int = 1 << 30):
        self.name = "so:" + os.path.basename(so.path)
        self.timeout = spec.timeout
        self.reject_code = reject_code
        self.max_output = max_output
        try:
            self.library = Library(so.path)
            self.library.init(so.argument)
        except FilterLoadError as e:
            raise FilterSpecError(f"filter {spec.text!r}: {e}") from None
        self._thread = _CallThread(f"so-filter {self.name}")
        self._lock = asyncio.Lock()
        self._stuck: asyncio.Future[Any] | None = None

    async def __call__(self, message: Message, stage: Any) -> FilterResult:
        fields = message_fields(message, stage)
        async with self._lock:
            if self._stuck is not None and not self._stuck.done():
                return _tempfail("in-process filter is still inside an earlier call")
            call = self._thread.submit(self.library.call, fields, message.content, self.max_output)
            try:
                answer: Answer = await asyncio.wait_for(asyncio.shield(call), self.timeout)
            except TimeoutError:
                self._stuck = call
                log.error("id=%s filter=%s (in-process) gave no answer within %gs and cannot be stopped; "
                          "messages get 451 until the call returns or the relay restarts",
                          message.id, self.name, self.timeout)
                return _tempfail(f"filter timed out after {self.timeout:g}s")
        return verdict_result(answer, stage, self.reject_code)  # the chain logs refusals with their reason

    async def aclose(self) -> None:
        """mailrelay_filter_cleanup() on the call thread, unless a call is still stuck there."""
        if self._stuck is None or self._stuck.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._thread.submit(self.library.cleanup)), STOP_GRACE)
            except TimeoutError:
                log.warning("filter=%s: mailrelay_filter_cleanup did not return within %gs", self.name, STOP_GRACE)
        self._thread.stop()


def make_filter(spec: FilterSpec) -> IsolatedSoFilter | InProcessSoFilter:
    """The factory for ``so:`` specs."""
    relay = spec.relay
    reject_code = relay.plugin_settings("filters").reject_code if relay is not None else 550
    size = relay.settings.smtp.size if relay is not None else 0
    max_output = (size or 256 << 20) + (1 << 20)  # an edited message may grow, but not without bound
    so = parse_so_spec(spec)
    kind = InProcessSoFilter if so.inprocess else IsolatedSoFilter
    return kind(spec, so, reject_code, max_output)


@hookimpl
def relay_filter_factory(register: Callable[[str, Callable[[FilterSpec], Any]], None]) -> None:
    register("so", make_filter)
