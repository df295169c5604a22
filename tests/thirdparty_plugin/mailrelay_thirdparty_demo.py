"""A third-party mailrelay plugin: uses only mailrelay_sdk, declares its own config section."""

from __future__ import annotations

from dataclasses import dataclass

from mailrelay_sdk import Verdict, hookimpl

_state: dict[str, str] = {}


@dataclass
class DemoSettings:
    log_file: str = ""
    blocked_prefix: str = "blocked@"


def _log(line: str) -> None:
    if _state.get("log_file"):
        with open(_state["log_file"], "a", encoding="utf-8") as f:
            f.write(line + "\n")


@hookimpl
def relay_config_schema():
    return {"demo": DemoSettings}


@hookimpl
def relay_startup(relay):
    settings = relay.plugin_settings("demo")
    _state["log_file"] = settings.log_file
    _state["blocked_prefix"] = settings.blocked_prefix
    _log("startup")


@hookimpl
async def on_rcpt_to(recipient):
    if recipient.address.startswith(_state.get("blocked_prefix", "blocked@")):
        _log(f"refused {recipient.address}")
        return Verdict.deny("Recipient blocked by thirdparty-demo", code=550, enhanced="5.7.1")
    return None


@hookimpl
def on_receive(message):
    _log(f"received {message.id} from {message.envelope.sender}")
