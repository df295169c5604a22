"""``filter-so``: (being written)."""

from __future__ import annotations

from typing import Any, Callable

from mailrelay_sdk import hookimpl

from mailrelay.filtering import FilterSpec


@hookimpl
def relay_filter_factory(register: Callable[[str, Callable[[FilterSpec], Any]], None]) -> None:
    return None
