"""DKIM keys: load a PEM private key, make a new one, and the DNS TXT record that publishes it.

Keys are PEM (PKCS#8, or PKCS#1 for RSA as older tools write them), RSA of 1024-4096 bits or
Ed25519. The public half goes into DNS as ``v=DKIM1; k=rsa; p=<SubjectPublicKeyInfo>`` or, for
Ed25519 (RFC 8463), ``k=ed25519; p=<the raw 32-octet key>``; both base64.
"""

from __future__ import annotations

import base64
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from mailrelay.config.loader import ConfigError
from mailrelay.spool import fsync_dir

KeyType = Literal["rsa", "ed25519"]
PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
MIN_RSA_BITS = 1024   # RFC 8301: verifiers need not accept less
MAX_RSA_BITS = 4096   # RFC 8301: verifiers need not accept more
TXT_CHUNK = 255       # one DNS character-string


@dataclass(frozen=True)
class DkimKey:
    """One loaded signing key with the domain and selector it signs for."""

    domain: str
    selector: str
    type: KeyType
    private: PrivateKey
    path: str = ""

    @property
    def algorithm(self) -> bytes:
        return b"rsa-sha256" if self.type == "rsa" else b"ed25519-sha256"

    @property
    def record_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    @property
    def txt_record(self) -> str:
        return txt_record(self.private)

    @property
    def dkimpy_private(self) -> bytes:
        """The private key as dkimpy's ``sign()`` parses it: PEM for RSA, base64 seed for Ed25519."""
        if isinstance(self.private, ed25519.Ed25519PrivateKey):
            raw = self.private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                             serialization.NoEncryption())
            return base64.b64encode(raw)
        return self.private.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.TraditionalOpenSSL,
                                          serialization.NoEncryption())


def key_type(private: PrivateKey) -> KeyType:
    return "ed25519" if isinstance(private, ed25519.Ed25519PrivateKey) else "rsa"


def txt_record(private: PrivateKey) -> str:
    """The value of the ``<selector>._domainkey.<domain>`` TXT record for ``private``'s public key."""
    public = private.public_key()
    if isinstance(public, ed25519.Ed25519PublicKey):
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}"
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"


def zone_line(name: str, record: str) -> str:
    """``name. IN TXT ( "..." "..." )``: the record split into DNS strings of at most 255 octets."""
    chunks = [record[i:i + TXT_CHUNK] for i in range(0, len(record), TXT_CHUNK)]
    return f'{name}. IN TXT ( {" ".join(chr(34) + c + chr(34) for c in chunks)} )'


def load_key(path: str, domain: str, selector: str, expected: KeyType, where: str) -> DkimKey:
    """Read and check a private key file; ConfigError with the file and the problem."""
    try:
        info = os.stat(path)
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{where}: cannot read the key {path}: {e.strerror}") from None
    if info.st_mode & (stat.S_IROTH | stat.S_IWOTH):
        raise ConfigError(f"{where}: the key {path} is readable or writable by every user; "
                          f"chmod 600 it (and publish a new one if others may have copied it)")
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: {path} is not an unencrypted PEM private key ({e})") from None
    if not isinstance(private, (rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)):
        raise ConfigError(f"{where}: {path} holds a {type(private).__name__}; DKIM signs with RSA or Ed25519")
    found = key_type(private)
    if found != expected:
        raise ConfigError(f"{where}: {path} is an {found} key; this setting needs an {expected} key")
    if isinstance(private, rsa.RSAPrivateKey) and not MIN_RSA_BITS <= private.key_size <= MAX_RSA_BITS:
        raise ConfigError(f"{where}: {path} is a {private.key_size}-bit RSA key; use {MIN_RSA_BITS}-"
                          f"{MAX_RSA_BITS} bits (2048 recommended)")
    return DkimKey(domain, selector, found, private, path)


def generate(kind: KeyType, bits: int = 2048) -> PrivateKey:
    """A new private key."""
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if not MIN_RSA_BITS <= bits <= MAX_RSA_BITS:
        raise ValueError(f"RSA keys of {bits} bits are not accepted by every verifier; use "
                         f"{MIN_RSA_BITS}-{MAX_RSA_BITS} (2048 recommended)")
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def pem(private: PrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted (the relay reads it unattended; the file mode protects it)."""
    return private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())


def write_private(path: Path, data: bytes) -> None:
    """Write a key file that is never readable by others, not even for an instant, and never
    replaces an existing key (whose public half may be in DNS).

    The data goes to a new temporary file created with mode 0600, is flushed, and is then linked
    under its final name (which fails if that name exists); the directory is flushed last.
    """
    directory = path.parent
    tmp = directory / f".{path.name}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)  # in case the file system ignored the creation mode
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
    fsync_dir(directory)
