"""Run a real relay in-process for tests: a free loopback port, a temporary spool, and only the
plugins under test.

    with RunningRelay(tmp_path / "spool", plugins={"mine": my_plugin_module}) as relay:
        smtplib.SMTP("127.0.0.1", relay.port).sendmail(...)
        assert relay.spool.ids()

The relay runs in its own thread with its own event loop, like aiosmtpd's ``Controller``.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any, Mapping

from mailrelay.config.loader import Sources, deep_merge
from mailrelay.config.settings import build_settings
from mailrelay.plugin_host import PluginHost
from mailrelay.relay import Relay
from mailrelay.spool import Spool

__all__ = ["RunningRelay"]


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

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self.call(self.relay.stop())
            self._thread.join(30)

    def __enter__(self) -> "RunningRelay":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
