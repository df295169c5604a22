"""The filter chain (``filters`` plugin) and the built-in filter kinds.

Each kind is its own plugin that claims schemes through ``relay_filter_factory``: ``filter-program``
(plain paths and ``pipe:``), ``filter-builtin`` (``exit:``, ``msgid:``, ``split:``, ``mx:``),
``filter-net``, ``filter-spam``, ``filter-so``, ``filter-mailbox`` (``copy:``, ``deliver:``),
``filter-archive`` and ``filter-milter``. Configuring a filter enables the chain and the kinds
its specs name.
"""

# Built-in scheme -> the plugin that claims it; configuring a spec enables that plugin.
BUILTIN_SCHEMES: dict[str, str] = {
    "file": "filter-program", "pipe": "filter-program",
    "exit": "filter-builtin", "msgid": "filter-builtin", "split": "filter-builtin", "mx": "filter-builtin",
    "net": "filter-net",
    "spam": "filter-spam", "spam-edit": "filter-spam",
    "so": "filter-so",
    "copy": "filter-mailbox", "deliver": "filter-mailbox",
    "archive": "filter-archive",
    "milter": "filter-milter",
}
