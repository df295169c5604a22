"""``filter-builtin``: E-MailRelay's small built-in filters.

* ``exit:N``: behave like a program that exits with ``N`` (``exit:103`` asks for a rescan).
"""

from __future__ import annotations

from typing import Any, Callable

from mailrelay_sdk import FilterResult, Message, hookimpl

from mailrelay.filtering import FilterSpec, FilterSpecError, result_from_exit


class ExitFilter:
    def __init__(self, spec: FilterSpec, reject_code: int = 550):
        text = spec.argument.strip()
        if not text.isdigit() or int(text) > 255:
            raise FilterSpecError(f"{spec.text!r}: exit: needs an exit code 0-255")
        self.code = int(text)
        self.name = f"exit:{self.code}"
        self.reject_code = reject_code

    async def __call__(self, message: Message, stage: Any) -> FilterResult:
        return result_from_exit(self.code, stage, reject_code=self.reject_code)


def _reject_code(spec: FilterSpec) -> int:
    return spec.relay.plugin_settings("filters").reject_code if spec.relay is not None else 550


@hookimpl
def relay_filter_factory(register: Callable[[str, Callable[[FilterSpec], Any]], None]) -> None:
    register("exit", lambda spec: ExitFilter(spec, _reject_code(spec)))
