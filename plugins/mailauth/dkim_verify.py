"""DKIM verification (RFC 6376, RFC 8463) and the ARC chain (RFC 8617), with dkimpy.

dkimpy asks a ``dnsfunc`` for keys synchronously; here the keys are fetched first, all at once,
through the shared async resolver, and dkimpy then verifies against those answers. A key that
could not be fetched (time-out, SERVFAIL) makes that signature ``temperror``; one that does not
exist ``permerror``; a signature that does not verify ``fail``.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import dkim
import dkim.util

from . import headers as hdr
from .dnsquery import BadName, Dns, DnsTempError

log = logging.getLogger("mailrelay.mailauth")


class _Quiet(logging.LoggerAdapter):  # type: ignore[type-arg]
    """dkimpy logs a bad signature from outside as an error; for us it is a result (debug)."""

    def log(self, level: int, msg: object, *args: object, **kwargs: object) -> None:
        self.logger.log(logging.DEBUG, msg, *args, **kwargs)  # type: ignore[arg-type]

    def isEnabledFor(self, level: int) -> bool:
        return self.logger.isEnabledFor(logging.DEBUG)


DKIMPY_LOG = _Quiet(logging.getLogger("mailrelay.mailauth.dkimpy"), {})
MIN_KEY_BITS = 1024  # RFC 8301
_ARC_NAMES = (b"arc-seal", b"arc-message-signature")
_FAILURES = ("body hash mismatch", "x= value is past")  # dkimpy's words for "did not verify"


@dataclass(frozen=True)
class DkimResult:
    """One signature's outcome: ``result`` is pass, fail, permerror or temperror."""

    result: str
    domain: str = ""
    selector: str = ""
    algorithm: str = ""
    header_b: str = ""   # the first 8 characters of b=, to tell signatures apart (RFC 6008)
    problem: str = ""


@dataclass(frozen=True)
class ArcResult:
    """The chain's state: none, pass, fail or temperror; ``instance`` is the highest i=."""

    result: str
    instance: int = 0
    problem: str = ""


@dataclass(frozen=True)
class _Key:
    record: bytes | None = None
    temporary: str = ""


async def _fetch_keys(names: set[bytes], dns: Dns) -> dict[bytes, _Key]:
    async def one(name: bytes) -> tuple[bytes, _Key]:
        try:
            answer = await dns.txt(name.decode("ascii"))
        except DnsTempError as e:
            return name, _Key(temporary=str(e))
        except (BadName, UnicodeDecodeError):
            return name, _Key()
        records = [r for r in answer.records if isinstance(r, bytes)]
        return name, _Key(records[0] if len(records) == 1 else None)  # several keys: none is usable

    return dict(await asyncio.gather(*(one(n) for n in names)))


def _key_name(tags: dict[bytes, bytes]) -> bytes | None:
    selector, domain = tags.get(b"s", b"").strip(), tags.get(b"d", b"").strip()
    if not selector or not domain:
        return None
    return selector + b"._domainkey." + domain.rstrip(b".") + b"."


def _lookup(keys: dict[bytes, _Key]):  # type: ignore[no-untyped-def]
    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        key = keys.get(name)
        return key.record if key is not None else None
    return dnsfunc


async def verify_dkim(content: bytes, dns: Dns, max_signatures: int = 5) -> list[DkimResult]:
    """Every DKIM signature of ``content`` (the first ``max_signatures``); ``[]`` when unsigned."""
    fields, _ = hdr.split(content)
    signatures = [f for f in fields if f.name == b"dkim-signature"][:max_signatures]
    if not signatures:
        return []
    parsed: list[dict[bytes, bytes] | None] = []
    for field in signatures:
        try:
            parsed.append(dkim.util.parse_tag_value(field.value))
        except dkim.util.InvalidTagValueList:
            parsed.append(None)
    keys = await _fetch_keys({n for t in parsed if t for n in [_key_name(t)] if n}, dns)
    verifier = _Verifier(content, keys)
    big = len(content) > 256 * 1024  # hashing a large body would stall the event loop
    results = []
    for index, tags in enumerate(parsed):
        if big:
            results.append(await asyncio.to_thread(verifier.one, index, tags))
        else:
            results.append(verifier.one(index, tags))
    return results


class _Verifier:
    def __init__(self, content: bytes, keys: dict[bytes, _Key]):
        self.content = content
        self.keys = keys
        self._parsed: dkim.DKIM | None = None  # one parse for all signatures

    def one(self, index: int, tags: dict[bytes, bytes] | None) -> DkimResult:
        if tags is None:
            return DkimResult("permerror", problem="unparsable DKIM-Signature")
        text = {k: v.decode("ascii", "replace").strip() for k, v in tags.items() if k in (b"d", b"s", b"a")}
        b_tag = b"".join(tags.get(b"b", b"").split()).decode("ascii", "replace")
        base = DkimResult("fail", text.get(b"d", "").lower(), text.get(b"s", ""), text.get(b"a", ""), b_tag[:8])
        name = _key_name(tags)
        key = self.keys.get(name) if name else None
        if key is not None and key.temporary:
            return _with(base, "temperror", f"key lookup failed: {key.temporary}")
        if key is not None and key.record is None:
            return _with(base, "permerror", "no key for signature")
        try:
            if self._parsed is None:
                self._parsed = dkim.DKIM(self.content, logger=DKIMPY_LOG, minkey=MIN_KEY_BITS)
            valid = self._parsed.verify(idx=index, dnsfunc=_lookup(self.keys))
        except dkim.ValidationError as e:
            # A body changed on the way, or an expired signature: it does not verify (fail);
            # a malformed signature cannot be checked at all (permerror).
            reason = str(e)
            return _with(base, "fail" if reason.startswith(_FAILURES) else "permerror", reason.split(" (")[0])
        except dkim.DKIMException as e:
            return _with(base, "permerror", str(e) or type(e).__name__)
        except Exception as e:  # dkimpy on hostile input: a broken signature, never a crash
            log.warning("dkimpy failed on signature %d: %s: %s", index, type(e).__name__, e)
            return _with(base, "permerror", f"{type(e).__name__}")
        return _with(base, "pass" if valid else "fail", "" if valid else "signature did not verify")


def _with(base: DkimResult, result: str, problem: str) -> DkimResult:
    return DkimResult(result, base.domain, base.selector, base.algorithm, base.header_b, problem)


async def verify_arc(content: bytes, dns: Dns) -> ArcResult:
    """The ARC chain of ``content``: ``none`` without ARC headers."""
    if not hdr.header_section_has(content, b"arc-seal"):
        return ArcResult("none")
    fields, _ = hdr.split(content)
    names = set()
    for field in fields:
        if field.name in _ARC_NAMES:
            try:
                name = _key_name(dkim.util.parse_tag_value(field.value))
            except dkim.util.InvalidTagValueList:
                continue
            if name:
                names.add(name)
    if not names:
        return ArcResult("fail", problem="no usable ARC signature")
    keys = await _fetch_keys(names, dns)
    temporary = [k.temporary for k in keys.values() if k.temporary]
    try:
        cv, results, reason = dkim.ARC(content, logger=DKIMPY_LOG, minkey=MIN_KEY_BITS).verify(
            dnsfunc=_lookup(keys))
    except dkim.DKIMException as e:
        return ArcResult("fail", problem=str(e))
    except Exception as e:
        log.warning("dkimpy failed on an ARC chain: %s: %s", type(e).__name__, e)
        return ArcResult("fail", problem=type(e).__name__)
    instance = max((int(r.get("instance", 0)) for r in results), default=0)
    state = (cv or b"fail").decode("ascii", "replace").lower()
    if state != "pass" and temporary:
        return ArcResult("temperror", instance, "key lookup failed: " + temporary[0])
    return ArcResult(state if state in ("pass", "fail", "none") else "fail", instance,
                     "" if state == "pass" else str(reason))
