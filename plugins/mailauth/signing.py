"""DKIM signatures and ARC seals for outgoing mail.

dkimpy does the DKIM that is easy to get subtly wrong: header selection and canonicalisation,
hashing, folding, and all of ARC. Two parts are ours, for speed, because signing sits on the
forwarding path of every message:

* the private-key operation runs in OpenSSL (``cryptography``): dkimpy's RSA is pure Python and
  takes about 11 ms per RSA-2048 signature here, OpenSSL under 1 ms, and releases the GIL, so it
  runs in a worker thread beside the event loop (:meth:`Signer.compute`);
* relaxed canonicalisation (:func:`relaxed_body`, :func:`relaxed_headers`) skips dkimpy's regular
  expressions where a text has nothing to change (no tab, no double space, no folding), the usual
  case; tests/test_dkim_canonical.py checks both against dkimpy's on generated input.
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
from dataclasses import dataclass
from typing import Any

import dkim
import dkim.util
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, padding
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from . import headers as hdr
from .dkim_verify import DKIMPY_LOG
from .keys import DkimKey, PrivateKey

SIGNATURE = b"DKIM-Signature"
_WSP_RUN = re.compile(rb"[ \t]{2,}|\t")
_LINE_END = re.compile(rb"\r\n|\r|\n")
_UNFOLD = re.compile(rb"\r?\n")
Fields = list[tuple[bytes, bytes]]


def relaxed_body(body: bytes) -> bytes:
    """RFC 6376 3.4.4: white-space runs to one space, none at line ends, no empty lines at the end."""
    if b"\t" in body or b"  " in body:
        body = _WSP_RUN.sub(b" ", body)
    if b" \r\n" in body:  # runs are single spaces now
        body = body.replace(b" \r\n", b"\r\n")
    end = len(body)
    while body.endswith(b"\r\n", 0, end):
        end -= 2
    return body[:end] + b"\r\n" if end else b""


def relaxed_headers(headers: Any) -> list[tuple[bytes, bytes]]:
    """RFC 6376 3.4.2 for ``[(name, value)]``: names in lower case, values unfolded, white-space
    runs to one space, none at either end; the regular expressions only where they change something."""
    out = []
    for name, value in headers:
        if value.endswith(b"\r\n"):
            value = value[:-2]
        if b"\n" in value:
            value = _UNFOLD.sub(b"", value)
        if b"\t" in value or b"  " in value:
            value = _WSP_RUN.sub(b" ", value)
        out.append((name.lower().rstrip(), value.strip() + b"\r\n"))
    return out


class _Relaxed:
    """The canonicalisation policy ``dkim.hash_headers`` is given (it only canonicalises headers)."""

    canonicalize_headers = staticmethod(relaxed_headers)


def private_operation(key: PrivateKey, digest: bytes) -> bytes:
    """The signature over a SHA-256 ``digest``: RSASSA-PKCS1-v1_5, or Ed25519 (RFC 8463 signs the hash)."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(digest)
    return key.sign(digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))


def _header_digest(fields: Fields, include: Any, canonical_headers: Any, name: bytes, policy: Any) -> bytes:
    """Hash the signed header fields and the signature header with an empty b=, folded the way it
    will be sent (a long b= placeholder puts b= on a line of its own, so filling it in moves nothing)."""
    unsigned = dkim.RE_BTAG.sub(b"\\1", dkim.fold(b"; ".join(b"=".join(f) for f in fields), namelen=len(name)))
    digest = hashlib.sha256()
    dkim.hash_headers(digest, policy, canonical_headers, include, (name, b" " + unsigned), dict(fields))
    return digest.digest()


def _signed_header(fields: Fields, signature: bytes, name: bytes, linesep: bytes = b"\r\n") -> bytes:
    filled = [(k, base64.b64encode(signature) if k == b"b" else v) for k, v in fields]
    return dkim.fold(b"; ".join(b"=".join(f) for f in filled) + linesep, namelen=len(name), linesep=linesep)


class _Arc(dkim.ARC):
    """dkimpy's ARC sealer, with the signatures computed by OpenSSL (``openssl_key``)."""

    openssl_key: PrivateKey

    def gen_header(self, fields: Fields, include_headers: Any, canon_policy: Any, header_name: bytes, pk: Any,
                   standardize: bool = False) -> bytes:
        if standardize:
            raise dkim.ParameterError("standardized ARC headers are not supported")
        digest = _header_digest(fields, include_headers, canon_policy.canonicalize_headers(self.headers),
                                header_name, canon_policy)
        return _signed_header(fields, private_operation(self.openssl_key, digest), header_name, self.linesep)


@dataclass(frozen=True)
class Prepared:
    """A message hashed for signing, waiting for its private-key operations."""

    content: bytes                                   # what gets signed and sent
    pending: tuple[tuple[DkimKey, Fields, bytes], ...] = ()  # (key, tags, header digest)
    note: str = ""


@dataclass(frozen=True)
class SignOutcome:
    """What signing did: the new content (``None``: unchanged) and a line for the log."""

    content: bytes | None
    note: str


class Signer:
    """Signs with the keys of the ``From:`` domain (or its nearest parent that has keys)."""

    def __init__(self, keys: list[DkimKey], headers: list[str], oversign: list[str]):
        self.keys: dict[str, list[DkimKey]] = {}
        for key in keys:
            self.keys.setdefault(key.domain, []).append(key)
        self.headers = [h.encode() for h in headers]
        self.oversign = {h.encode() for h in oversign}

    def keys_for(self, domain: str) -> list[DkimKey]:
        """``mail.example.com`` uses ``example.com``'s keys when it has none of its own: the
        signature still aligns with DMARC's relaxed mode."""
        labels = domain.split(".")
        for i in range(len(labels) - 1):
            found = self.keys.get(".".join(labels[i:]))
            if found:
                return found
        return []

    def sign(self, content: bytes) -> SignOutcome:
        """:meth:`prepare`, :meth:`compute` and :meth:`finish` in one blocking call."""
        prepared = self.prepare(content)
        if not prepared.pending:
            return SignOutcome(None, prepared.note)
        return SignOutcome(self.finish(prepared, self.compute(prepared)), prepared.note)

    def prepare(self, content: bytes) -> Prepared:
        """Everything up to the private-key operations (CPU, under the GIL; quick for small mail)."""
        if not content.count(b"\r") == content.count(b"\n") == content.count(b"\r\n"):
            content = _LINE_END.sub(b"\r\n", content)  # what the SMTP client will send
        fields, rest = hdr.split(content)
        domains, count = hdr.from_domains(fields)
        if count != 1 or len(domains) != 1 or not domains[0]:
            return Prepared(content, note=f"not signed: {count} From: fields with {len(domains)} domains")
        keys = self.keys_for(domains[0])
        if not keys:
            return Prepared(content, note=f"not signed: no DKIM key for {domains[0]}")
        fields, kept, stale = self._ours(fields, rest, keys)
        todo = [k for k in keys if (k.domain, k.selector) not in kept]
        if stale:
            content = hdr.join(fields, rest)
        if not todo:
            return Prepared(content, note="already signed: " + ", ".join(f"d={d} s={s}" for d, s in sorted(kept)))
        names = [f.name for f in fields]
        include = [h for h in self.headers for _ in range(names.count(h) + (h in self.oversign))]
        wanted = set(include)
        canonical = relaxed_headers([f.raw.split(b":", 1) for f in fields if f.name in wanted])
        body = relaxed_body(rest[2:] if rest.startswith(b"\r\n") else b"")
        body_hash = base64.b64encode(hashlib.sha256(body).digest())
        now = str(int(time.time())).encode()
        pending = []
        for key in todo:
            tags = [(b"v", b"1"), (b"a", key.algorithm), (b"c", b"relaxed/relaxed"), (b"d", key.domain.encode()),
                    (b"s", key.selector.encode()), (b"t", now), (b"h", b" : ".join(include)), (b"bh", body_hash),
                    (b"b", b"0" * 60)]  # no l=: it lets anyone append to the body (RFC 6376 8.2)
            pending.append((key, tags, _header_digest(tags, include, canonical, SIGNATURE, _Relaxed)))
        note = "signed " + ", ".join(f"d={k.domain} s={k.selector} a={k.algorithm.decode()}" for k in todo)
        if stale:
            note += f" (removed {stale} invalid signature(s) of ours)"
        return Prepared(content, tuple(pending), note)

    @staticmethod
    def compute(prepared: Prepared) -> list[bytes]:
        """The private-key operations: OpenSSL, without the GIL (run it in a worker thread)."""
        return [private_operation(key.private, digest) for key, _, digest in prepared.pending]

    @staticmethod
    def finish(prepared: Prepared, signatures: list[bytes]) -> bytes:
        added = [SIGNATURE + b": " + _signed_header(tags, signature, SIGNATURE)
                 for (_, tags, _), signature in zip(prepared.pending, signatures)]
        return b"".join(added) + prepared.content

    def _ours(self, fields: list[hdr.Field], rest: bytes,
              keys: list[DkimKey]) -> tuple[list[hdr.Field], set[tuple[str, str]], int]:
        """Signatures already made with ``keys`` (a message looping back, or signed upstream with
        our key): the valid ones are kept and that key signs no more; invalid ones are removed."""
        wanted = {(k.domain, k.selector): k for k in keys}
        signatures = [f for f in fields if f.name == b"dkim-signature"]
        if not signatures:
            return fields, set(), 0
        content = hdr.join(fields, rest)
        kept: set[tuple[str, str]] = set()
        drop: list[hdr.Field] = []
        for index, field in enumerate(signatures):
            try:
                tags = dkim.util.parse_tag_value(field.value)
            except dkim.util.InvalidTagValueList:
                continue
            ident = (tags.get(b"d", b"").decode("ascii", "replace").lower().rstrip("."),
                     tags.get(b"s", b"").decode("ascii", "replace"))
            key = wanted.get(ident)
            if key is None:
                continue
            record = key.txt_record.encode()
            try:
                valid = dkim.DKIM(content, logger=DKIMPY_LOG).verify(idx=index,
                                                                    dnsfunc=lambda _name, timeout=5: record)
            except dkim.DKIMException:
                valid = False
            if valid:
                kept.add(ident)
            else:
                drop.append(field)
        return [f for f in fields if f not in drop], kept, len(drop)


def seal(content: bytes, key: DkimKey, authserv_id: str) -> bytes | None:
    """Add an ARC set (RFC 8617) with ``key`` over our ``Authentication-Results`` (``authserv_id``);
    ``None`` when the message carries no such header (we did not check it, so we vouch for
    nothing). Raises ``dkim.DKIMException`` for a message dkimpy cannot seal."""
    if not hdr.header_section_has(content, b"authentication-results"):
        return None
    arc = _Arc(content, logger=DKIMPY_LOG, signature_algorithm=b"rsa-sha256")
    arc.openssl_key = key.private
    added = arc.sign(key.selector.encode(), key.domain.encode(), key.dkimpy_private, authserv_id.encode())
    return b"".join(added) + content if added else None


def self_test(key: DkimKey) -> None:
    """Sign a small message with ``key`` and verify it with dkimpy against the key's own record:
    a key or library problem stops start-up instead of sending mail with broken signatures."""
    message = f"From: <postmaster@{key.domain}>\r\nSubject: self-test\r\n\r\nself  test \r\n\r\n".encode()
    outcome = Signer([key], ["from", "subject"], ["from"]).sign(message)
    record = key.txt_record.encode()
    if outcome.content is None or not dkim.verify(outcome.content, logger=DKIMPY_LOG,
                                                  dnsfunc=lambda _name, timeout=5: record):
        raise RuntimeError(f"DKIM self-test failed for d={key.domain} s={key.selector} ({key.path})")
