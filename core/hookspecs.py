"""Hook specifications: the contract between the core and every plugin, built-in or third-party.

A plugin is a module or object registered under the ``mailrelay`` entry-point group; it implements
any of the functions below, marked with ``@hookimpl`` (from ``mailrelay_sdk``), using any subset
of the arguments by name. Implementations may be plain functions or coroutines.

How the core calls them (not pluggy's default order):

* Plugins run in the order the operator enabled them (``--plugins a,b`` or ``[plugins] enable``);
  an implementation marked ``@hookimpl(tryfirst=True)`` or ``(trylast=True)`` runs before or
  after all the others whatever that order.
* *Decision hooks* (``on_connect`` .. ``on_receive``) stop at the first decisive verdict: any
  :class:`~mailrelay.types.Verdict` other than ``CONT``; ``None`` means ``CONT``.
* Each call has a time limit (``[plugins] hook_timeout``). A plugin that raises, overruns, or
  returns something of the wrong type is logged with its name and counts as a temporary failure
  (4xx for the client); it never crashes the daemon and never loses an accepted message.
* ``MAILRELAY_TRACE_HOOKS=1`` logs every hook call with its arguments and result.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    import click
    import flask

    from .config.settings import Settings
    from .filtering import Filter, FilterSpec
    from .message import Message
    from .plugin_host import HookCaller
    from .relay import Relay
    from .types import DeliveryResult, Event, FilterResult, Recipient, Route, Session, Stage, Transaction, Verdict

PROJECT = "mailrelay"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

#: Bumped when a hook's signature or meaning changes incompatibly. A plugin may declare the version
#: it was written for (``hookspec_version = 1``) and the mailrelay versions it needs
#: (``requires_core = ">=0.2"`` when it uses a hook added in 0.2); the plugin host refuses a plugin
#: whose declaration this core does not meet, at start-up and before registering any of it.
HOOKSPEC_VERSION = 1


# ---------------------------------------------------------------- SMTP phases (decision hooks)
@hookspec
def on_connect(session: Session) -> Verdict | None:
    """A client connected (after any PROXY header), before the 220 greeting.

    :param session: the new session; ``peer_ip`` is the client's address.
    :return: ``None``/``CONT`` to carry on. ``DENY`` answers the greeting with the verdict's reply
        (give ``code=554``, RFC 5321 3.1) and closes; ``DENYSOFT``/``DISCONNECT`` answer 421 and close.
        ``OK`` skips the remaining ``on_connect`` plugins. Use for DNSBL, connection limits and
        allow lists.
    """


@hookspec
def on_helo(session: Session, hostname: str) -> Verdict | None:
    """The client sent HELO or EHLO with ``hostname`` (``session.esmtp`` tells which).

    :return: a rejecting verdict answers the HELO/EHLO with its reply; the session stays open
        (unless ``DISCONNECT``) and the client may try again.
    """


@hookspec
def on_auth(session: Session, mechanism: str, username: str, password: str | None,
            challenge: str | None, response: str | None) -> Verdict | None:
    """The client presented credentials with AUTH.

    PLAIN and LOGIN pass ``password``; CRAM-MD5 passes ``challenge`` and ``response`` instead.
    :return: ``OK`` authenticates ``username`` (235); ``DENY`` fails it (535); ``DENYSOFT`` is a
        temporary failure (454). ``None`` from every plugin means authentication fails.
    """


@hookspec
def auth_mechanisms(session: Session) -> list[str] | None:
    """Which SASL mechanisms (``PLAIN``, ``LOGIN``, ``CRAM-MD5``) to offer ``session`` now.

    Asked at each EHLO (the ``AUTH`` line) and each AUTH command; ``session.tls`` and
    ``session.is_loopback`` tell whether the channel counts as secure. The first plugin that
    answers decides; when none does, the relay offers no AUTH at all.
    """


@hookspec
def on_mail_from(session: Session, transaction: Transaction, address: str) -> Verdict | None:
    """MAIL FROM was received and parsed; ``address`` is ``""`` for the null reverse-path.

    ``transaction`` is the new transaction (its ``sender``, ``body``, ``smtputf8`` and
    ``size_hint`` are filled in). A rejecting verdict refuses the sender; no transaction starts.
    ``DISCARD`` or ``QUARANTINE`` mark the whole transaction.
    """


@hookspec
def on_rcpt_to(session: Session, transaction: Transaction, recipient: Recipient) -> Verdict | None:
    """RCPT TO was received for ``recipient`` (remote by default).

    :return: a rejecting verdict refuses this recipient only. A verdict that carries
        ``recipient=`` replaces it: rewrite the address, or mark it local with
        ``Recipient.local(address, mailbox)`` (what E-MailRelay's address verifiers do). A
        ``CONT`` verdict may carry one too (``Verdict.cont(recipient=...)``): the later plugins
        still run, and still see the recipient as the client gave it (relay control judges that
        address, not a verifier's rewrite); the last recipient carried is the one recorded.
    """


@hookspec
def on_vrfy(session: Session, address: str) -> Verdict | None:
    """The client sent VRFY with ``address`` (angle brackets removed; not otherwise parsed).

    :return: a decisive verdict answers the VRFY with its reply (``250`` with the user's full
        name, ``252`` for an address that would be accepted, ``550``/``450`` for one that would
        not); ``None`` from every plugin answers ``252 2.5.2 Cannot verify the user``.
    """


@hookspec
def on_receive(message: Message) -> Verdict | None:
    """DATA is complete and the content is in memory, before anything is written or acknowledged.

    ``message.content`` includes the ``Received:`` header the relay added; a plugin may edit it
    with ``message.replace_content(...)`` (add a header, say) and the edit is what gets spooled.
    A rejecting verdict
    answers the DATA command; ``DISCARD`` acknowledges and drops the message; ``QUARANTINE``
    stores it as ``.envelope.bad`` with the verdict's reason (held, never forwarded).
    """


# ---------------------------------------------------------------- filters, routing, delivery
@hookspec
def on_filter(message: Message, stage: Stage) -> FilterResult | None:
    """Run the filter chain for ``stage``: ``"server"`` before the 250, ``"client"`` before forwarding.

    At the server stage the message is already written as ``.envelope.new`` (``message.content_path``)
    and a filter may edit the files or return edited content in ``FilterResult.content``. Filters
    run in configured order; ``None`` or ``OK`` continue with the next one (which sees any edit),
    ``REJECT``, ``ABANDON`` and ``FAIL`` stop the chain.
    """


@hookspec
def route(message: Message, recipient: Recipient) -> Route | None:
    """Choose where ``recipient`` of ``message`` goes (queue runner). First non-``None`` wins."""


@hookspec
def deliver(route: Route, batch: list[Message]) -> list[DeliveryResult] | None:
    """Deliver ``batch`` (messages sharing ``route``); return one result per recipient.

    The plugin that handles ``route.kind`` answers; others return ``None``. First non-``None`` wins.
    """


@hookspec
def on_event(event: Event) -> None:
    """Something happened (received, rejected, delivered, deferred, bounced, ...). Observers only:
    the return value is ignored, and the core does not wait for slow observers before replying."""


# ---------------------------------------------------------------- lifecycle and registration
@hookspec
def relay_startup(relay: Relay) -> None:
    """The relay is configured and the spool is open, before listeners start. Plugins open
    connections and read their settings (``relay.plugin_settings(section)``) here."""


@hookspec
def relay_shutdown(relay: Relay) -> None:
    """The relay is stopping, after listeners have closed. Release what ``relay_startup`` took."""


@hookspec
def relay_listeners(relay: Relay) -> list[Any] | None:
    """Return extra servers to run in the relay's event loop (POP3, admin HTTP).

    Each object has ``async start()`` and ``async stop()``; the core starts them after
    ``relay_startup`` and stops them on shutdown. A server that socket activation may feed takes
    its sockets with ``relay.inherited_sockets(name)`` by ``start()`` at the latest, and binds
    with :func:`mailrelay.net.bind` (addresses, ``fd#N``, Unix socket paths).
    """


@hookspec
def relay_admin_blueprint(relay: Relay) -> flask.Blueprint | None:
    """Return a Flask blueprint to mount in the admin web server (authenticated like the rest)."""


@hookspec
def relay_cli(cli: click.Group) -> None:
    """Add subcommands to the ``relay`` command (``cli.add_command(...)``)."""


@hookspec
def relay_config_schema() -> dict[str, type] | None:
    """Declare this plugin's configuration sections: ``{"section": SettingsDataclass}``.

    The core validates ``[section]`` from ``relay.conf`` against the dataclass at start-up and
    reports errors with the file and key; the plugin reads the result with
    ``relay.plugin_settings("section")``.
    """


@hookspec
def relay_check_config(settings: Settings, hooks: HookCaller) -> None:
    """``relay check-config``: raise ``ConfigError`` for a problem the section schemas cannot
    express (a filter scheme that no plugin claims, say), so it shows before the daemon starts.

    Runs without a relay: read ``settings`` (``settings.extra[section]`` for plugin sections) and
    ``hooks.impls(name)``; touch neither the network nor the spool.
    """


@hookspec
def relay_filter_factory(register: Callable[[str, Callable[[FilterSpec], Filter]], None]) -> None:
    """Claim filter schemes: call ``register("spam", make_spam_filter)`` once per scheme.

    The factory receives the :class:`~mailrelay.filtering.FilterSpec` of each configured filter
    with that scheme (``spam:127.0.0.1:783`` gives argument ``127.0.0.1:783``) at start-up, and
    returns a :class:`~mailrelay.filtering.Filter`; raising ``FilterSpecError`` (or ``ValueError``)
    with a readable message makes a bad spec a start-up error. A plain program path has the
    scheme ``file``. Two plugins claiming one scheme is a start-up error.
    """
