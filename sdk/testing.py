"""Test a plugin against a real relay: a pytest plugin, and the harness under it.

Installed with mailrelay (the ``pytest11`` entry point), so a plugin package's tests just use the
fixtures. Name the plugins under test (and any configuration) by overriding two fixtures::

    import pytest
    from mailrelay_sdk.testing import assert_accepted, assert_delivered, assert_rejected

    @pytest.fixture
    def relay_plugins():
        return ["greylist"]                  # entry-point names; or {"name": plugin_object}

    @pytest.fixture
    def relay_config():
        return {"greylist": {"delay": 1}}    # relay.conf as a dict

    def test_first_attempt_is_greylisted(relay):
        assert_rejected(relay.send(), 451, enhanced="4.7.1")

    def test_forwarded_mail_arrives(relay, sink):   # with `sink`, the relay forwards to it
        assert_accepted(relay.send(recipients=["a@example.test"]))
        assert_delivered(sink, to="a@example.test")

``relay`` is a :class:`RunningRelay` on ``127.0.0.1`` and a free port, with a temporary spool and
only the named plugins enabled (plus ``forward`` when the test also uses ``sink``);
``relay_factory(plugins=..., config=...)`` starts more. The relay runs in its own thread with its
own event loop, like aiosmtpd's ``Controller``, so tests use plain blocking clients.
"""

from __future__ import annotations

import asyncio
import re
import smtplib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import pytest

from mailrelay.config.loader import Sources, deep_merge
from mailrelay.config.settings import build_settings
from mailrelay.plugin_host import PluginHost
from mailrelay.relay import Relay
from mailrelay.spool import Spool

from .sink import Sink, SinkMessage

__all__ = ["RunningRelay", "SendResult", "Sink", "SinkMessage", "assert_accepted", "assert_bounced",
           "assert_delivered", "assert_rejected", "send"]

_QUEUED = re.compile(r"queued as (\S+)")
_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")


class RunningRelay:
    """A relay on ``127.0.0.1:<free port>`` serving from a background thread."""

    def __init__(self, spool_dir: str | Path, *, plugins: Mapping[str, Any] | None = None,
                 enable: list[str] | None = None, config: Mapping[str, Any] | None = None):
        """``plugins`` registers objects under names (in order); ``enable`` loads installed plugins
        by entry-point name; ``config`` is raw ``relay.conf`` content (a nested dict)."""
        self.host = PluginHost()
        if enable:
            self.host.enable(enable)
        for name, obj in (plugins or {}).items():
            self.host.register(obj, name)
        raw: dict[str, Any] = {"smtp": {"port": 0, "interface": ["127.0.0.1"]},
                               "spool": {"dir": str(spool_dir)}, "server": {"domain": "relay.test"}}
        deep_merge(raw, {k: dict(v) if isinstance(v, Mapping) else v for k, v in (config or {}).items()})
        schemas: dict[str, type] = {}
        for result in self.host.pm.hook.relay_config_schema():
            schemas.update(result or {})
        self.settings = build_settings(raw, Sources(), schemas)
        self.relay = Relay(self.settings, self.host)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def port(self) -> int:
        return self.relay.smtp_port

    @property
    def spool(self) -> Spool:
        return self.relay.spool

    def start(self) -> "RunningRelay":
        self._thread = threading.Thread(target=self._run, name="relay-under-test", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self.relay.start())
        except BaseException as e:  # report start-up failures to the test thread
            self._error = e
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        loop.run_until_complete(self.relay.wait_stopped())
        loop.close()

    def call(self, coro: Any, timeout: float = 30) -> Any:
        """Run a coroutine in the relay's loop and wait for its result."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def send(self, content: bytes | str | None = None, **kwargs: Any) -> "SendResult":
        """Send one message to this relay over SMTP; see :func:`send`."""
        return send(self.port, content, **kwargs)

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self.call(self.relay.stop())
            self._thread.join(30)

    def __enter__(self) -> "RunningRelay":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------- sending and asserting
@dataclass(frozen=True)
class SendResult:
    """How one SMTP transaction ended: the reply that decided it and where it came.

    ``stage`` is ``connect``, ``helo``, ``mail``, ``rcpt`` (every recipient refused) or ``data``;
    ``text`` is the reply text with its enhanced code (``"4.7.1 Greylisted"``); ``refused`` maps
    each refused recipient to its (code, text), also when others were accepted.
    """

    stage: str
    code: int
    text: str
    refused: Mapping[str, tuple[int, str]] = field(default_factory=dict)

    @property
    def accepted(self) -> bool:
        return self.stage == "data" and self.code == 250

    @property
    def enhanced(self) -> str:
        match = _ENHANCED.match(self.text)
        return match.group(0) if match else ""

    @property
    def spool_id(self) -> str:
        """The relay's id for an accepted message (``250 ... queued as <id>``), else ``""``."""
        match = _QUEUED.search(self.text)
        return match.group(1) if match else ""

    def __str__(self) -> str:
        return f"{self.code} {self.text} (at {self.stage})"


def default_message(sender: str, recipients: Sequence[str], subject: str, body: str) -> bytes:
    return (f"From: <{sender}>\r\nTo: {', '.join(f'<{r}>' for r in recipients)}\r\n"
            f"Subject: {subject}\r\n\r\n{body}\r\n").encode("utf-8")


def send(port: int | RunningRelay, content: bytes | str | None = None, *, sender: str = "sender@example.test",
         recipients: Sequence[str] = ("rcpt@example.test",), subject: str = "Test message",
         body: str = "Hello.", helo: str = "client.example.test", timeout: float = 30.0) -> SendResult:
    """Run one SMTP transaction against ``127.0.0.1:port``; never raises for a refusal.

    Without ``content`` a small message with ``subject`` and ``body`` is made up. Bare LF line
    ends are sent as CRLF, as a well-behaved client would.
    """
    if isinstance(port, RunningRelay):
        port = port.port
    if content is None:
        content = default_message(sender, recipients, subject, body)
    data = content.encode("utf-8") if isinstance(content, str) else content
    data = re.sub(rb"\r?\n", b"\r\n", data)
    client = smtplib.SMTP(timeout=timeout)
    try:
        code, reply = client.connect("127.0.0.1", port)
        if code != 220:
            return SendResult("connect", code, reply.decode("utf-8", "replace"))
        code, reply = client.ehlo(helo)
        if code != 250:
            return SendResult("helo", code, reply.decode("utf-8", "replace"))
        code, reply = client.mail(sender)
        if code != 250:
            return SendResult("mail", code, reply.decode("utf-8", "replace"))
        refused: dict[str, tuple[int, str]] = {}
        for recipient in recipients:
            code, reply = client.rcpt(recipient)
            if code not in (250, 251):
                refused[recipient] = (code, reply.decode("utf-8", "replace"))
        if len(refused) == len(recipients):
            first_code, first_text = next(iter(refused.values())) if refused else (554, "no recipients")
            return SendResult("rcpt", first_code, first_text, refused)
        try:
            code, reply = client.data(data)
        except smtplib.SMTPDataError as e:  # DATA itself refused (no 354)
            error = e.smtp_error
            code, reply = e.smtp_code, error if isinstance(error, bytes) else error.encode()
        return SendResult("data", code, reply.decode("utf-8", "replace"), refused)
    except smtplib.SMTPServerDisconnected as e:
        return SendResult("disconnect", 0, str(e))
    finally:
        try:
            client.quit()
        except (smtplib.SMTPException, OSError):
            client.close()


def assert_accepted(result: SendResult) -> str:
    """The message was accepted (250 at the end of DATA); return its spool id."""
    if not result.accepted:
        raise AssertionError(f"expected the message to be accepted, but it got {result}")
    return result.spool_id


def assert_rejected(result: SendResult, code: int | None = None, *, enhanced: str | None = None,
                    text: str | None = None, stage: str | None = None) -> None:
    """The transaction was refused, with ``code`` (e.g. 451 or 550), the ``enhanced`` status code,
    a reply containing ``text``, at ``stage`` (``mail``, ``rcpt``, ``data``...), as given."""
    problems = []
    if result.accepted:
        problems.append("it was accepted")
    if code is not None and result.code != code:
        problems.append(f"the code is {result.code}, not {code}")
    if enhanced is not None and result.enhanced != enhanced:
        problems.append(f"the enhanced code is {result.enhanced or 'missing'}, not {enhanced}")
    if text is not None and text not in result.text:
        problems.append(f"the reply does not contain {text!r}")
    if stage is not None and result.stage != stage:
        problems.append(f"it was refused at {result.stage}, not {stage}")
    if problems:
        raise AssertionError(f"expected a rejection, but {'; '.join(problems)}: {result}")


def assert_delivered(sink: Sink, *, to: str | None = None, sender: str | None = None,
                     timeout: float = 15.0) -> SinkMessage:
    """Wait until the sink has a message (not a bounce) for ``to`` from ``sender``; return it."""
    def wanted(m: SinkMessage) -> bool:
        return (not m.is_bounce and (to is None or to in m.recipients)
                and (sender is None or m.sender == sender))
    return _wait_for(sink, wanted, timeout, f"a message{f' to {to}' if to else ''}"
                                            f"{f' from {sender}' if sender else ''}")


def assert_bounced(sink: Sink, *, to: str, recipient: str | None = None, timeout: float = 15.0) -> SinkMessage:
    """Wait until the sink has a delivery status notification for ``to`` (the original sender),
    reporting a failure for ``recipient`` when given; return it."""
    def wanted(m: SinkMessage) -> bool:
        if not m.is_bounce or to not in m.recipients:
            return False
        return recipient is None or recipient.encode() in m.content
    return _wait_for(sink, wanted, timeout, f"a bounce to {to}{f' about {recipient}' if recipient else ''}")


def _wait_for(sink: Sink, wanted: Callable[[SinkMessage], bool], timeout: float, what: str) -> SinkMessage:
    end = time.monotonic() + timeout
    while True:
        found = [m for m in sink.messages if wanted(m)]
        if found:
            return found[0]
        if time.monotonic() > end:
            seen = [(m.sender, m.recipients) for m in sink.messages]
            raise AssertionError(f"the sink got no {what} within {timeout:g}s (it got: {seen or 'nothing'})")
        time.sleep(0.02)


# ---------------------------------------------------------------- the pytest plugin
@pytest.fixture
def relay_plugins() -> list[str] | Mapping[str, Any]:
    """The plugins under test: entry-point names, or ``{name: plugin_object}``. Override it."""
    return []


@pytest.fixture
def relay_config() -> Mapping[str, Any]:
    """Configuration for the relay under test, as the ``relay.conf`` tables would be. Override it."""
    return {}


@pytest.fixture
def sink() -> Iterator[Sink]:
    """A recording SMTP server on a free loopback port; a ``relay`` in the same test forwards to it."""
    with Sink() as server:
        yield server


@pytest.fixture
def relay_factory(tmp_path: Path) -> Iterator[Callable[..., RunningRelay]]:
    """Start relays: ``relay_factory(plugins=..., config=..., forward_to=sink)``; stopped at teardown."""
    running: list[RunningRelay] = []

    def start(plugins: Sequence[str] | Mapping[str, Any] = (), config: Mapping[str, Any] | None = None,
              forward_to: Sink | None = None) -> RunningRelay:
        enable = [] if isinstance(plugins, Mapping) else list(plugins)
        objects = plugins if isinstance(plugins, Mapping) else {}
        raw = {k: dict(v) if isinstance(v, Mapping) else v for k, v in (config or {}).items()}
        if forward_to is not None:
            deep_merge(raw, {"forward": {"to": forward_to.address}})
            if "forward" not in enable:
                enable.append("forward")
        relay = RunningRelay(tmp_path / f"spool{len(running)}", plugins=objects, enable=enable, config=raw)
        running.append(relay)
        return relay.start()

    yield start
    for relay in running:
        relay.stop()


@pytest.fixture
def relay(request: pytest.FixtureRequest, relay_factory: Callable[..., RunningRelay],
          relay_plugins: Sequence[str] | Mapping[str, Any], relay_config: Mapping[str, Any]) -> RunningRelay:
    """A started relay with ``relay_plugins`` and ``relay_config``, forwarding to ``sink`` if the
    test uses that fixture too."""
    forward_to = request.getfixturevalue("sink") if "sink" in request.fixturenames else None
    if forward_to is not None and not isinstance(forward_to, Sink):
        forward_to = None  # a project's own fixture named "sink" is something else
    return relay_factory(plugins=relay_plugins, config=relay_config, forward_to=forward_to)
