"""DANE for SMTP (RFC 7672): TLSA records, validated by DNSSEC, say which certificate an MX host has.

DNSSEC validation is the resolver's job: the relay asks the configured resolver (``[dns]
nameservers``) for the AD bit and trusts it, so that resolver must validate and the path to it
must be trusted (a validating resolver on the same host, such as unbound). Without the AD bit on
the MX answer, the host's addresses and its TLSA answer, DANE does not apply.

For a host with usable TLSA records (RFC 7672 section 3.1) TLS is mandatory and the certificate
must match one of them:

- DANE-EE (usage 3): the server's own certificate (selector 0) or public key (selector 1) matches;
  its names and validity dates are not checked;
- DANE-TA (usage 2): a certificate the server sends above its own matches, and the chain from the
  server's certificate up to it verifies, including validity dates and the host name (the MX host
  name, or the recipient domain).

An MX host that is a CNAME alias (a validated chain) has two candidate TLSA base domains: the
fully expanded name, tried first, and the MX host name, used when the expanded name has no
validated records (RFC 7672 section 2.2.2, see ``security._host_tlsa``).

Matching types: 0 (the whole DER), 1 (SHA-256) and 2 (SHA-512). Records with usage 0 or 1
(PKIX) or other parameters are unusable in SMTP; a secure TLSA RRset with none usable still
makes TLS mandatory, without authentication (Postfix's behaviour).
"""

from __future__ import annotations

import datetime
import hashlib
import ssl
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.name
import dns.resolver
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.verification import (Criticality, DNSName, ExtensionPolicy, PolicyBuilder, Store,
                                            VerificationError)

_DIGESTS = {0: None, 1: hashlib.sha256, 2: hashlib.sha512}


@dataclass(frozen=True)
class Tlsa:
    """One TLSA record: certificate usage, selector, matching type and the association data."""

    usage: int
    selector: int
    mtype: int
    data: bytes

    @property
    def usable(self) -> bool:
        return self.usage in (2, 3) and self.selector in (0, 1) and self.mtype in _DIGESTS

    def __str__(self) -> str:
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()[:16]}..."

    def matches(self, certificate: x509.Certificate, der: bytes) -> bool:
        selected = der if self.selector == 0 else certificate.public_key().public_bytes(
            Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        digest = _DIGESTS[self.mtype]
        return (selected if digest is None else digest(selected).digest()) == self.data


@dataclass(frozen=True)
class TlsaAnswer:
    """What DNS says about ``_port._tcp.host``: ``records`` is empty when DANE does not apply
    (no records, or an answer without the AD bit); ``error`` is set when the lookup failed."""

    name: str
    records: tuple[Tlsa, ...] = ()
    error: str = ""
    base: str = ""      # the TLSA base domain: the host name the records were looked up for


def validating_resolver(base: dns.asyncresolver.Resolver) -> dns.asyncresolver.Resolver:
    """A resolver like ``base`` (same servers, port and time limits) that asks for the AD bit
    (RFC 6840 section 5.7: a validating resolver then says whether the answer was validated)."""
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = list(base.nameservers)
    resolver.port = base.port
    resolver.timeout, resolver.lifetime = base.timeout, base.lifetime
    resolver.flags = dns.flags.RD | dns.flags.AD
    return resolver


async def lookup_tlsa(resolver: dns.asyncresolver.Resolver, host: str, port: int) -> TlsaAnswer:
    """The authenticated TLSA records of ``_port._tcp.host`` (``resolver`` asks for AD)."""
    name = f"_{port}._tcp.{host}"
    try:
        answer = await resolver.resolve(dns.name.from_text(name), "TLSA")
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return TlsaAnswer(name)
    except dns.exception.DNSException as e:
        # A validating resolver answers SERVFAIL for records that fail validation (bogus).
        return TlsaAnswer(name, error=f"TLSA lookup of {name} failed: {e}")
    if not answer.response.flags & dns.flags.AD:
        return TlsaAnswer(name)
    return TlsaAnswer(name, tuple(Tlsa(r.usage, r.selector, r.mtype, bytes(r.cert)) for r in answer), base=host)


def peer_chain(ssl_object: ssl.SSLObject) -> list[bytes]:
    """The certificates the server sent (its own first), DER, as received (not verified)."""
    chain = getattr(ssl_object, "get_unverified_chain", None)  # public from Python 3.13
    if chain is None:
        chain = getattr(getattr(ssl_object, "_sslobj", None), "get_unverified_chain", None)  # 3.10-3.12
    if chain is not None:
        certificates = chain() or []
        return [c if isinstance(c, bytes) else c.public_bytes(ssl._ssl.ENCODING_DER)  # type: ignore[attr-defined]
                for c in certificates]
    leaf = ssl_object.getpeercert(binary_form=True)
    return [leaf] if leaf else []


def check_certificate(chain_der: list[bytes], records: tuple[Tlsa, ...], names: tuple[str, ...],
                      now: datetime.datetime | None = None) -> str:
    """Why the server's chain does not satisfy the TLSA records ("" when it does)."""
    usable = [r for r in records if r.usable]
    if not usable:
        return ""  # encryption only (section 2.2)
    if not chain_der:
        return "the server sent no certificate"
    try:
        chain = [x509.load_der_x509_certificate(der) for der in chain_der]
    except ValueError as e:
        return f"unreadable server certificate: {e}"
    leaf = chain[0]
    if any(r.usage == 3 and r.matches(leaf, chain_der[0]) for r in usable):
        return ""
    problems = []
    for index in range(1, len(chain)):
        if not any(r.usage == 2 and r.matches(chain[index], chain_der[index]) for r in usable):
            continue
        problem = _verify_up_to(chain, index, names, now)
        if not problem:
            return ""
        problems.append(problem)
    if problems:
        return f"the chain to the trust anchor in the TLSA records does not verify: {problems[0]}"
    sha256 = hashlib.sha256(leaf.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo))
    return (f"no TLSA record matches the server's certificate (its public key's SHA-256 is "
            f"{sha256.hexdigest()}; records: {', '.join(map(str, usable))})")


def _verify_up_to(chain: list[x509.Certificate], anchor: int, names: tuple[str, ...],
                  now: datetime.datetime | None) -> str:
    """Verify ``chain[0]`` up to ``chain[anchor]`` as the only trust anchor, for one of ``names``.

    The CA certificates are held to the Web PKI's rules; the server's own certificate only needs
    a subjectAltName with the name (the CA/Browser Forum's rules for it, such as a non-critical
    subjectAltName, do not bind private CAs that DANE-TA exists for)."""
    server_policy = ExtensionPolicy.permit_all().require_present(x509.SubjectAlternativeName,
                                                                 Criticality.AGNOSTIC, None)
    builder = (PolicyBuilder().store(Store([chain[anchor]]))
               .time(now or datetime.datetime.now(datetime.timezone.utc))
               .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=server_policy))
    problem = ""
    for name in names:
        try:
            builder.build_server_verifier(DNSName(name)).verify(chain[0], chain[1:anchor])
            return ""
        except (VerificationError, ValueError) as e:
            problem = problem or f"{e} (names tried: {', '.join(names)})"
    return problem or "no name to check"
