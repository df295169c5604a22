"""The async-aware hook caller.

pluggy calls implementations synchronously, last-registered first, and ``firstresult`` would treat
an un-awaited coroutine as a result. So the core walks the implementations itself: in the
operator's order, awaiting coroutines under a time limit, turning every plugin failure into a
temporary-failure value, and stopping where the hook's semantics say.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import os
import time
from typing import Any, Awaitable, Callable

import pluggy

from ..config.loader import ConfigError
from ..types import Event, FilterAction, FilterResult, Recipient, Verdict
from .manager import PluginHost

log = logging.getLogger("mailrelay.plugins")

TEMPFAIL_TEXT = "Temporary local problem, please try again later"


class PluginFailure(Exception):
    """A plugin raised, overran its time limit, or returned the wrong type."""

    def __init__(self, plugin: str, hook: str, detail: str):
        super().__init__(f"plugin {plugin!r} failed in {hook}: {detail}")
        self.plugin = plugin
        self.hook = hook


class HookCaller:
    """Calls hooks of the enabled plugins; one per relay."""

    def __init__(self, host: PluginHost, *, timeout: float = 30.0):
        self.host = host
        self.timeout = timeout
        self._timeouts: dict[str, float] = {}
        self.trace = os.environ.get("MAILRELAY_TRACE_HOOKS", "") not in ("", "0")
        self._impls: dict[str, list[pluggy.HookImpl]] = {}
        self._observer_tasks: set[asyncio.Task[None]] = set()

    def impls(self, hook: str) -> list[pluggy.HookImpl]:
        """Implementations of ``hook`` in the configured plugin order (cached)."""
        cached = self._impls.get(hook)
        if cached is None:
            caller = getattr(self.host.pm.hook, hook)
            rank = {name: i for i, name in enumerate(self.host.order)}
            # get_hookimpls() is in pluggy's reverse-call order; keep it as the tie-break.
            impls = list(reversed(caller.get_hookimpls()))
            # pluggy's own markers still place an implementation before or after all others
            # (a DKIM signer must see the message after every filter that may edit it).
            cached = sorted(impls, key=lambda impl: (1 if impl.trylast else -1 if impl.tryfirst else 0,
                                                     rank.get(impl.plugin_name, len(rank))))
            self._impls[hook] = cached
        return cached

    def has(self, hook: str) -> bool:
        return bool(self.impls(hook))

    def allow_time(self, hook: str, seconds: float) -> None:
        """Let ``hook`` run up to ``seconds`` (never less than the general limit): the filter chain
        has its own per-filter timeouts, longer than the limit for ordinary hooks."""
        self._timeouts[hook] = max(seconds, self._timeouts.get(hook, 0.0))

    async def _call_one(self, impl: pluggy.HookImpl, hook: str, kwargs: dict[str, Any]) -> Any:
        args = {name: kwargs[name] for name in impl.argnames if name in kwargs}
        started = time.perf_counter()
        limit = max(self.timeout, self._timeouts.get(hook, 0.0))
        try:
            result = impl.function(**args)
            if inspect.isawaitable(result):
                async with asyncio.timeout(limit):  # unlike wait_for, no extra task per call
                    result = await result
        except asyncio.TimeoutError:
            raise PluginFailure(impl.plugin_name, hook, f"no answer within {limit:g}s") from None
        except asyncio.CancelledError:
            raise
        except Exception as e:
            # Whoever catches the PluginFailure reports it; only a bug's traceback is logged here.
            # A configuration problem is phrased for the operator, and a traceback would bury it.
            if not isinstance(e, ConfigError):
                log.error("plugin=%s hook=%s raised %s: %s", impl.plugin_name, hook, type(e).__name__, e,
                          exc_info=True)
            raise PluginFailure(impl.plugin_name, hook, f"{type(e).__name__}: {e}") from e
        if self.trace:
            log.info("trace hook=%s plugin=%s args=%r result=%r elapsed_ms=%.1f", hook,
                     impl.plugin_name, args, result, (time.perf_counter() - started) * 1000)
        return result

    # ---------------------------------------------------------------- semantics
    async def decide(self, hook: str, **kwargs: Any) -> Verdict:
        """Decision hooks: the first decisive verdict wins; a plugin failure is a 4xx verdict.

        A ``CONT`` verdict may carry a ``recipient`` (``on_rcpt_to``: an address verifier's
        rewrite): the last one carried goes into the result unless the deciding verdict names its
        own, so a rewrite does not stop the plugins after it. Every plugin is still asked about
        the recipient the client gave.
        """
        carried: Recipient | None = None
        for impl in self.impls(hook):
            try:
                result = await self._call_one(impl, hook, kwargs)
            except PluginFailure as e:
                log.error("%s; answering with a temporary failure", e)
                return Verdict.deny_soft(TEMPFAIL_TEXT, code=451, enhanced="4.3.0", reason=str(e))
            if result is None:
                continue
            if not isinstance(result, Verdict):
                log.error("plugin=%s hook=%s returned %r, not a Verdict; answering with a temporary "
                          "failure", impl.plugin_name, hook, type(result).__name__)
                return Verdict.deny_soft(TEMPFAIL_TEXT, code=451, enhanced="4.3.0",
                                         reason=f"plugin {impl.plugin_name} returned {result!r}")
            if result.decisive:
                if carried is not None and result.recipient is None and result.accepted:
                    return dataclasses.replace(result, recipient=carried)
                return result
            if result.recipient is not None:
                carried = result.recipient
        return Verdict.cont(recipient=carried)

    async def filter_chain(self, message: Any, stage: str,
                           apply_edit: Callable[[bytes], Awaitable[None]] | None = None) -> FilterResult:
        """Run ``on_filter`` implementations in order; stop at the first non-OK result.

        Edits (``FilterResult.content``) are applied to ``message`` before the next filter runs;
        ``apply_edit`` is awaited with the new content so the caller can rewrite the spool file.
        Rescan / stop-scanning flags from every filter that ran are merged into the result.
        """
        rescan = stop = False
        for impl in self.impls("on_filter"):
            try:
                result = await self._call_one(impl, "on_filter", {"message": message, "stage": stage})
            except PluginFailure as e:
                log.error("%s; treating as a temporary filter failure", e)
                return FilterResult.fail(TEMPFAIL_TEXT, 451, "4.3.0")
            if result is None:
                continue
            if not isinstance(result, FilterResult):
                log.error("plugin=%s on_filter returned %r, not a FilterResult", impl.plugin_name, result)
                return FilterResult.fail(TEMPFAIL_TEXT, 451, "4.3.0")
            rescan |= result.rescan
            stop |= result.stop_scanning
            if result.content is not None:
                message.replace_content(result.content)
                if apply_edit is not None:
                    await apply_edit(result.content)
            if result.action is not FilterAction.OK:
                return FilterResult(result.action, result.code, result.enhanced, result.text,
                                    None, rescan, stop, result.reason)
        return FilterResult(FilterAction.OK, rescan=rescan, stop_scanning=stop)

    async def first(self, hook: str, **kwargs: Any) -> Any:
        """``route``/``deliver``: the first non-``None`` result (a failure propagates as PluginFailure)."""
        for impl in self.impls(hook):
            result = await self._call_one(impl, hook, kwargs)
            if result is not None:
                return result
        return None

    async def each(self, hook: str, **kwargs: Any) -> list[Any]:
        """Lifecycle and registration hooks: call every implementation, collect non-``None`` results.

        A failure here propagates: at start-up it is a clear error, not a half-started relay.
        """
        results = []
        for impl in self.impls(hook):
            result = await self._call_one(impl, hook, kwargs)
            if result is not None:
                results.append(result)
        return results

    # ---------------------------------------------------------------- observers
    def emit(self, event: Event) -> None:
        """Tell ``on_event`` observers without making the caller wait; errors are only logged."""
        impls = self.impls("on_event")
        if not impls:
            return
        task = asyncio.get_running_loop().create_task(self._notify(impls, event))
        self._observer_tasks.add(task)
        task.add_done_callback(self._observer_tasks.discard)

    async def _notify(self, impls: list[pluggy.HookImpl], event: Event) -> None:
        for impl in impls:
            try:
                await self._call_one(impl, "on_event", {"event": event})
            except PluginFailure as e:
                log.warning("%s (event %s ignored by it)", e, event.name)

    async def drain_observers(self, timeout: float = 5.0) -> None:
        """Let pending observer calls finish (shutdown), cancelling what overruns ``timeout``."""
        tasks = list(self._observer_tasks)
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for t in pending:
            t.cancel()
