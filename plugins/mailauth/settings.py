"""The sections of both plugins: ``[dkim]`` and ``[arc]`` (signing), ``[mailauth]``, ``[spf]`` and
``[dmarc]`` (checks), and the notion of a trusted client they share with relay control."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from mailrelay.config.loader import ConfigError
from mailrelay.net import in_networks

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: relay control's default ``[relay] networks``: who may relay when nothing else is configured.
DEFAULT_NETWORKS = ("127.0.0.0/8", "::1/128")
#: RFC 6376 5.4.1's recommended set plus RFC 8058's List-Unsubscribe-Post; signed when present.
DEFAULT_HEADERS = (
    "from", "reply-to", "subject", "date", "to", "cc", "resent-date", "resent-from", "resent-to",
    "resent-cc", "in-reply-to", "references", "list-id", "list-help", "list-unsubscribe",
    "list-unsubscribe-post", "list-subscribe", "list-post", "list-owner", "list-archive", "message-id",
    "mime-version", "content-type", "content-transfer-encoding", "content-id", "content-description",
    "sender",
)
#: Signed once more than they occur, so that nobody can add one (RFC 6376 8.15).
DEFAULT_OVERSIGN = ("from",)
DNS_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9_-]{0,61}"
                       r"[A-Za-z0-9])?)*")
_HEADER_NAME = re.compile(r"[!-9;-~]+")
KEY_FIELDS = ("selector", "key", "ed25519_selector", "ed25519_key")


def parse_networks(texts: list[str], where: str) -> tuple[Network, ...]:
    """Addresses or networks (CIDR) to networks; ConfigError naming ``where`` for a bad one."""
    networks = []
    for text in texts:
        try:
            networks.append(ipaddress.ip_network(str(text).strip(), strict=False))
        except ValueError:
            raise ConfigError(f"{where}: {text!r} is not an address or network (CIDR)") from None
    return tuple(networks)


def normalise_domain(text: str, where: str) -> str:
    """A signing domain: lower case, A-labels, no trailing dot."""
    domain = str(text).strip().rstrip(".").lower()
    try:
        domain = domain.encode("idna").decode("ascii") if not domain.isascii() else domain
    except UnicodeError:
        raise ConfigError(f"{where}: {text!r} is not a domain name") from None
    if not domain or "." not in domain or not DNS_NAME.fullmatch(domain):
        raise ConfigError(f"{where}: {text!r} is not a domain name")
    return domain


@dataclass(frozen=True)
class KeySpec:
    """Where one domain's keys are: an RSA key and/or an Ed25519 key, each with its selector."""

    domain: str
    selector: str = ""
    key: str = ""
    ed25519_selector: str = ""
    ed25519_key: str = ""

    @classmethod
    def build(cls, domain: str, values: dict[str, Any], where: str) -> "KeySpec":
        unknown = sorted(set(values) - set(KEY_FIELDS))
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(KEY_FIELDS)})")
        spec = cls(domain, **{k: str(v).strip() for k, v in values.items()})
        for selector, key, label in ((spec.selector, spec.key, ""), (spec.ed25519_selector, spec.ed25519_key,
                                                                      "ed25519_")):
            if bool(selector) != bool(key):
                raise ConfigError(f"{where}: {label}selector and {label}key go together")
            if selector and not DNS_NAME.fullmatch(selector):
                raise ConfigError(f"{where}: {label}selector {selector!r} is not a DNS label")
        if spec.selector and spec.selector == spec.ed25519_selector:
            raise ConfigError(f"{where}: the RSA and Ed25519 keys need different selectors (one DNS record each)")
        return spec

    @property
    def empty(self) -> bool:
        return not (self.key or self.ed25519_key)


@dataclass
class DkimSettings:
    """``[dkim]``: who signs, with which keys, over which header fields."""

    domain: str = ""              # the signing domain of the keys below; default: the --domain
    selector: str = ""            # the RSA key's selector: its record is <selector>._domainkey.<domain>
    key: str = ""                 # RSA private key (PEM), 2048 bits recommended
    ed25519_selector: str = ""    # a second signature with an Ed25519 key (RFC 8463)
    ed25519_key: str = ""
    domains: dict[str, Any] = field(default_factory=dict)  # [dkim.domains."example.org"]: the same four keys
    headers: list[str] = field(default_factory=lambda: list(DEFAULT_HEADERS))   # signed when present
    oversign: list[str] = field(default_factory=lambda: list(DEFAULT_OVERSIGN))  # and once more
    networks: list[str] = field(default_factory=list)  # clients whose mail is signed; default [relay] networks

    def __post_init__(self) -> None:
        self.headers = [_header_name(h, "[dkim] headers") for h in self.headers]
        self.oversign = [_header_name(h, "[dkim] oversign") for h in self.oversign]
        if "from" not in self.headers:
            raise ConfigError("[dkim] headers: From must be signed (RFC 6376 5.4)")
        self._networks = parse_networks(self.networks, "[dkim] networks")
        for name, values in self.domains.items():
            if not isinstance(values, dict):
                raise ConfigError(f"[dkim.domains.{name!r}]: expected a table with selector and key")

    def key_specs(self, default_domain: str) -> list[KeySpec]:
        """Every domain's keys, the top-level ones first; ConfigError when there are none."""
        specs = []
        top = {k: getattr(self, k) for k in KEY_FIELDS if getattr(self, k)}
        if top:
            domain = normalise_domain(self.domain or default_domain, "[dkim] domain")
            specs.append(KeySpec.build(domain, top, "[dkim]"))
        for name, values in self.domains.items():
            domain = normalise_domain(name, f"[dkim.domains.{name!r}]")
            spec = KeySpec.build(domain, values, f"[dkim.domains.{name!r}]")
            if spec.empty:
                raise ConfigError(f"[dkim.domains.{name!r}]: no key (set selector and key)")
            if any(s.domain == domain for s in specs):
                raise ConfigError(f"[dkim.domains.{name!r}]: keys for {domain} are configured twice")
            specs.append(spec)
        if not specs:
            raise ConfigError("[dkim]: no signing key (set selector and key, or [dkim.domains.\"DOMAIN\"]; "
                              "relay dkim keygen makes one)")
        return specs

    @property
    def network_list(self) -> tuple[Network, ...]:
        return self._networks


@dataclass
class ArcSettings:
    """``[arc]``: seal relayed mail (RFC 8617) so that receivers after us can trust our checks."""

    seal: bool = True             # needs the mailauth plugin's Authentication-Results and an RSA key
    domain: str = ""              # default: [dkim] domain, with its RSA selector and key
    selector: str = ""
    key: str = ""


@dataclass
class MailauthSettings:
    """``[mailauth]``: what all inbound checks share."""

    authserv_id: str = ""         # in Authentication-Results; default: the --domain
    temperror: Literal["defer", "tag"] = "defer"  # DNS time-out or SERVFAIL: 451 4.7.x, or accept and say so
    exempt_trusted: bool = True   # authenticated clients and trusted networks are not checked
    networks: list[str] = field(default_factory=list)  # trusted networks; default [relay] networks
    timeout: float = 20.0         # seconds for all DNS of one check (SPF, or DKIM + ARC + DMARC)
    max_signatures: int = 5       # DKIM signatures verified per message (the first ones)
    cache_size: int = 10_000      # DNS answers kept for their TTL

    def __post_init__(self) -> None:
        self._networks = parse_networks(self.networks, "[mailauth] networks")
        if not 0.5 <= self.timeout <= 300:
            raise ConfigError(f"[mailauth] timeout: {self.timeout:g} is out of range 0.5..300 seconds")
        if not 1 <= self.max_signatures <= 50:
            raise ConfigError(f"[mailauth] max_signatures: {self.max_signatures} is out of range 1..50")
        if self.cache_size < 0:
            raise ConfigError(f"[mailauth] cache_size: {self.cache_size} is negative")

    @property
    def network_list(self) -> tuple[Network, ...]:
        return self._networks


@dataclass
class SpfSettings:
    """``[spf]``: the check at MAIL FROM and what its results do."""

    enabled: bool = True
    fail: Literal["reject", "tag"] = "reject"       # "-all" matched: 550 5.7.23, or only record it
    permerror: Literal["reject", "tag"] = "tag"     # a broken record: 550 5.7.24, or only record it


@dataclass
class DmarcSettings:
    """``[dmarc]``: what a failing message gets under each published policy."""

    enabled: bool = True
    reject: Literal["reject", "tag"] = "reject"            # p=reject: 550 5.7.1
    quarantine: Literal["quarantine", "tag"] = "tag"       # p=quarantine: hold as .envelope.bad, or tag


def trusted_networks(own: tuple[Network, ...], relay: Any) -> tuple[Network, ...]:
    """The plugin's own ``networks`` if set, else relay control's ``[relay] networks`` (when that
    plugin is enabled), else its default: the same clients relay control lets relay."""
    if own:
        return own
    relay_settings = relay.settings.extra.get("relay")
    texts = list(getattr(relay_settings, "networks", DEFAULT_NETWORKS))
    return parse_networks(texts, "[relay] networks")


def is_trusted(peer_ip: str, networks: tuple[Network, ...]) -> bool:
    """Is ``peer_ip`` in ``networks``? No address (a Unix socket, a message the relay made
    itself) counts as 127.0.0.1, as relay control counts it."""
    return in_networks(peer_ip, networks)


def _header_name(text: str, where: str) -> str:
    name = str(text).strip().lower()
    if not _HEADER_NAME.fullmatch(name):
        raise ConfigError(f"{where}: {text!r} is not a header field name")
    return name
