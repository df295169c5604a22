"""``relay-control``: no open relay.

A client that may not relay can only send to the relay's own domains::

    [relay]
    local_domains = ["example.com", "[192.0.2.25]"]   # default: the --domain
    networks = ["127.0.0.0/8", "::1/128"]             # clients that may relay (the default)

Who may relay: clients whose address is in ``networks``, authenticated sessions and clients that a
``server none`` line of the ``--server-auth`` secrets file trusts. Everybody
else gets ``550 5.7.1 Relaying denied`` for a recipient unless

* its domain is one of ``local_domains``: compared without regard to case, exactly (no
  sub-domains, no trailing dot; an address literal only when listed), or
* an address verifier that runs before this plugin accepted it as a local mailbox, or
* it is ``<postmaster>`` without a domain (RFC 5321 4.5.1).

Even at a local domain, a local part that names another destination for a downstream mailer is
refused: the percent hack (``user%other@local``), bang paths (``other!user@local``), quoted local
parts holding ``@``, ``%``, ``!`` or ``:``, source routes, and control characters. The decision is
about the address the client gave (a verifier's rewrite does not change it), as Postfix's
``reject_unauth_destination`` does.

Serving remote clients (``--remote-clients``) turns this plugin on; ``networks = ["0.0.0.0/0",
"::/0"]`` is how an operator who really wants an open relay says so. The plugin adds no special
case for loopback: it is trusted only because it is in the default ``networks``.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Union

from mailrelay_sdk import Recipient, Session, Verdict, hookimpl

from mailrelay.config.loader import ConfigError
from mailrelay.net import in_networks

log = logging.getLogger("mailrelay.relay_control")

DEFAULT_NETWORKS = ("127.0.0.0/8", "::1/128")
VERIFIER_PLUGIN = "verifier"
Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

# Characters that route mail onwards when a downstream mailer reads them in a local part.
_ROUTING = frozenset("@%!:")
_CONTROL_ESCAPES = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F]}  # one log line per event


@dataclass
class RelaySettings:
    """``[relay]``: where anybody may send, and who may send anywhere."""

    local_domains: list[str] = field(default_factory=list)  # empty: the relay's --domain
    networks: list[str] = field(default_factory=lambda: list(DEFAULT_NETWORKS))


def hidden_destination(address: str) -> str:
    """Why ``address`` could send mail somewhere other than its domain says; ``""`` if it cannot."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in address):
        return "control character in the address"
    if address.startswith("@"):
        return "source route"
    local, _, _ = address.rpartition("@")
    if local.startswith('"') and local.endswith('"') and len(local) >= 2:
        text = _unquote(local[1:-1])
        if _ROUTING & set(text):
            return "quoted local part with a routing character"
        return ""
    if "%" in local:
        return "percent hack"
    if "!" in local:
        return "bang path"
    if _ROUTING & set(local):
        return "routing character in the local part"
    return ""


def _unquote(text: str) -> str:
    out, escaped = [], False
    for ch in text:
        if escaped or ch != "\\":
            out.append(ch)
            escaped = False
        else:
            escaped = True
    return "".join(out)


def normalise_domain(domain: str) -> str:
    """A configured domain as the SMTP parser stores one: lower case, A-labels, no trailing dot."""
    domain = domain.strip().rstrip(".").lower()
    if not domain:
        raise ValueError("an empty domain")
    if domain.startswith("["):
        if not domain.endswith("]"):
            raise ValueError(f"{domain!r} is not an address literal")
        return domain
    if not domain.isascii():
        domain = domain.encode("idna").decode("ascii")
    return domain


@dataclass(frozen=True)
class RelayPolicy:
    """The validated policy: a recipient decision for one client."""

    local_domains: frozenset[str]
    networks: tuple[Network, ...]

    @classmethod
    def build(cls, settings: RelaySettings, default_domain: str) -> "RelayPolicy":
        """Validate ``[relay]``; a bad entry is a configuration error naming it."""
        domains = []
        for text in settings.local_domains or [default_domain]:
            try:
                domains.append(normalise_domain(text))
            except (ValueError, UnicodeError) as e:
                raise ConfigError(f"[relay] local_domains: {text!r}: {e}") from None
        networks = []
        for text in settings.networks:
            try:
                networks.append(ipaddress.ip_network(text.strip(), strict=False))
            except ValueError as e:
                raise ConfigError(f"[relay] networks: {e}") from None
        return cls(frozenset(domains), tuple(networks))

    def trusts(self, peer_ip: str) -> bool:
        """Is a client at ``peer_ip`` in the relay networks? A Unix-socket client (no address)
        counts as 127.0.0.1."""
        return in_networks(peer_ip, self.networks)

    def is_local_domain(self, address: str) -> bool:
        local, at, domain = address.rpartition("@")
        return bool(at and local) and domain.lower() in self.local_domains

    def refusal(self, session: Session, recipient: Recipient) -> str:
        """Why ``session`` may not send to ``recipient``; ``""`` when it may."""
        # The auth plugin marks clients that a "server none" secrets line trusts.
        if recipient.is_local or session.auth_user or session.notes.get("trusted") or self.trusts(session.peer_ip):
            return ""
        address = recipient.address
        if address.lower() == "postmaster":
            return ""
        problem = hidden_destination(address)
        if problem:
            return problem
        if not self.is_local_domain(address):
            return "not a local domain"
        return ""


class RelayControlPlugin:
    """One instance per relay (the entry point names the class)."""

    def __init__(self) -> None:
        self.policy: RelayPolicy | None = None

    @hookimpl
    def relay_config_schema(self) -> dict[str, type]:
        return {"relay": RelaySettings}

    @hookimpl
    def relay_startup(self, relay: Any) -> None:
        settings: RelaySettings = relay.plugin_settings("relay")
        self.policy = RelayPolicy.build(settings, relay.domain)
        _check_order(relay.plugins.order, relay.plugins.pm.get_name(self))
        log.info("relay control: local domains %s; relay networks %s", ",".join(sorted(self.policy.local_domains)),
                 ",".join(str(n) for n in self.policy.networks) or "(none)")

    @hookimpl
    def on_rcpt_to(self, session: Session, recipient: Recipient) -> Verdict | None:
        assert self.policy is not None
        problem = self.policy.refusal(session, recipient)
        if not problem:
            return None
        log.info("session=%s client=%s rcpt=<%s> relaying denied: %s", session.id, session.peer_ip,
                 recipient.address.translate(_CONTROL_ESCAPES), problem)
        return Verdict.deny("Relaying denied", code=550, enhanced="5.7.1", reason=f"relaying denied: {problem}")


def _check_order(order: Iterable[str], me: str | None) -> None:
    """The verifier's local verdicts count only if it runs first: a wrong order is a start-up error."""
    names = list(order)
    if VERIFIER_PLUGIN in names and me in names and names.index(VERIFIER_PLUGIN) > names.index(me):
        raise ConfigError(f"plugin order: {VERIFIER_PLUGIN!r} must come before {me!r} (list it first in "
                          "[plugins] enable or --plugins)")
