"""Plugin discovery, registration and the async hook caller."""

from .caller import HookCaller, PluginFailure
from .manager import ENTRY_POINT_GROUP, PluginError, PluginHost, PluginInfo

__all__ = ["ENTRY_POINT_GROUP", "HookCaller", "PluginError", "PluginFailure", "PluginHost", "PluginInfo"]
