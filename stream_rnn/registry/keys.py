"""Keys that sign and verify model-update announcements: Ed25519 or an HMAC secret.

Two kinds, told apart by the file's content:

- **Ed25519** (PEM): the publisher holds the private key (``update.key``, mode 0600), workers
  only the public key (``update.pub``, may be world-readable). A compromised worker cannot
  sign. Made by ``stream-rnn models keygen --out DIR``.
- **HMAC-SHA256** (anything else): one random secret shared by publisher and workers, mode
  0600, at least 32 bytes and not a passphrase (``head -c 32 /dev/urandom | base64``).

The announcement names its algorithm and the signature covers it; a key verifies only its own
algorithm, so a worker with a public key refuses HMAC-signed messages and vice versa.

Example::

    key = load_update_key(Path("/etc/stream-rnn/update.pub"))
    key.verify(payload, signature)          # True / False
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from stream_rnn.registry.exceptions import RegistryError

__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "UpdateKey",
    "as_update_key",
    "check_hmac_secret",
    "generate_ed25519",
    "load_update_key",
]

Algorithm = Literal["hmac-sha256", "ed25519"]
ALGORITHMS: tuple[str, ...] = get_args(Algorithm)
MIN_SECRET_BYTES = 32
MIN_SECRET_BITS = 128
MIN_DISTINCT = 16
MAX_KEY_FILE_BYTES = 16 * 1024
MAKE_SECRET = "head -c 32 /dev/urandom | base64 > {path} && chmod 600 {path}"  # noqa: S105
_HEX = re.compile(rb"^[0-9a-fA-F]+$")
_B64 = re.compile(rb"^[A-Za-z0-9+/_=-]+$")


@dataclass(frozen=True, eq=False)
class UpdateKey:
    """A signing or verifying key of one `Algorithm`.

    ``secret`` for HMAC; ``private`` (signs, and verifies with its public half) or only
    ``public`` (verifies) for Ed25519.

    >>> key = UpdateKey.hmac(b"s3cr3t-" * 8)
    >>> key.verify(b"payload", key.sign(b"payload"))
    True
    """

    alg: Algorithm
    secret: bytes | None = None
    private: Ed25519PrivateKey | None = None
    public: Ed25519PublicKey | None = None
    source: str = "(in memory)"

    @classmethod
    def hmac(cls, secret: bytes, source: str = "(in memory)") -> UpdateKey:
        return cls(alg="hmac-sha256", secret=secret, source=source)

    @property
    def can_sign(self) -> bool:
        return self.secret is not None or self.private is not None

    def sign(self, payload: bytes) -> str:
        """The hex signature of ``payload``; `RegistryError` for a public key."""
        if self.secret is not None:
            return hmac.new(self.secret, payload, hashlib.sha256).hexdigest()
        if self.private is not None:
            return self.private.sign(payload).hex()
        raise RegistryError(
            f"{self.source} is an Ed25519 public key: it verifies announcements but cannot sign "
            "them; publish with the private key (update.key of `stream-rnn models keygen`)"
        )

    def verify(self, payload: bytes, signature: str) -> bool:
        """Whether ``signature`` (hex) signs ``payload`` under this key (constant time)."""
        if self.secret is not None:
            return hmac.compare_digest(signature, self.sign(payload))
        public = self.public or (self.private.public_key() if self.private else None)
        if public is None:
            return False
        try:
            public.verify(bytes.fromhex(signature), payload)
        except (InvalidSignature, ValueError):
            return False
        return True


def as_update_key(key: bytes | UpdateKey) -> UpdateKey:
    """``key`` itself, or raw bytes as an HMAC secret (programmatic use; files go through
    `load_update_key`, which also checks the secret's strength)."""
    return key if isinstance(key, UpdateKey) else UpdateKey.hmac(bytes(key))


def load_update_key(path: Path) -> UpdateKey:
    """The key in ``path``: an Ed25519 PEM private or public key, else an HMAC secret.

    Refuses a missing or non-regular file (symlinks too), a private key or secret that group or
    others may read or write (a public key may be world-readable, never writable), and an HMAC
    secret that is short or looks like a passphrase (`check_hmac_secret`).
    """
    where = Path(path)
    try:
        info = os.lstat(where)
    except FileNotFoundError:
        raise RegistryError(
            f"update key file {where} does not exist; create an Ed25519 pair with "
            f"`stream-rnn models keygen --out DIR` or an HMAC secret with "
            f"`{MAKE_SECRET.format(path=where)}`"
        ) from None
    if not stat.S_ISREG(info.st_mode):
        raise RegistryError(f"update key file {where} is not a regular file (or is a symlink)")
    with where.open("rb") as fh:
        raw = fh.read(MAX_KEY_FILE_BYTES + 1)
    if len(raw) > MAX_KEY_FILE_BYTES:
        raise RegistryError(f"update key file {where} is over {MAX_KEY_FILE_BYTES} bytes")
    mode = stat.S_IMODE(info.st_mode)
    text = raw.strip()
    if text.startswith(b"-----BEGIN PUBLIC KEY-----"):
        if mode & 0o022:
            raise RegistryError(
                f"public key {where} is writable by group/others (mode {mode:03o}): anyone "
                f"could swap in their own key; `chmod 644 {where}`"
            )
        return UpdateKey(alg="ed25519", public=_pem_public(text, where), source=str(where))
    if mode & 0o077:
        kind = "private key" if b"PRIVATE KEY" in text else "update key (HMAC secret)"
        raise RegistryError(
            f"{kind} file {where} is readable or writable by group/others (mode {mode:03o}); "
            f"restrict it with `chmod 600 {where}`"
        )
    if text.startswith(b"-----BEGIN"):
        return UpdateKey(alg="ed25519", private=_pem_private(text, where), source=str(where))
    check_hmac_secret(text, where)
    return UpdateKey.hmac(text, source=str(where))


def check_hmac_secret(secret: bytes, where: Path | str = "the key") -> None:
    """`RegistryError` unless ``secret`` is ≥ 32 bytes and random-looking (≥ 128 bits).

    Refused: words and spaces (a passphrase), fewer than 16 distinct characters, whitespace
    inside, and hex/base64/other text whose estimated entropy is under 128 bits.
    """
    how = f"make one with `{MAKE_SECRET.format(path=where)}`, or use Ed25519 keys"
    if not secret:
        raise RegistryError(f"update key file {where} is empty; {how}")
    if len(secret) < MIN_SECRET_BYTES:
        raise RegistryError(
            f"update key in {where} has {len(secret)} bytes; use at least {MIN_SECRET_BYTES} "
            f"random bytes: {how}"
        )
    distinct = len(set(secret))
    if re.fullmatch(rb"[A-Za-z\s]+", secret) or re.search(rb"\s", secret):
        raise RegistryError(f"update key in {where} looks like a passphrase (words): {how}")
    if distinct < MIN_DISTINCT:
        raise RegistryError(
            f"update key in {where} uses only {distinct} distinct characters: not random; {how}"
        )
    if _HEX.match(secret):
        bits = 4.0 * len(secret)
    elif _B64.match(secret.rstrip(b"=")):
        bits = 6.0 * len(secret.rstrip(b"="))
    else:
        bits = math.log2(min(distinct, 256) or 1) * len(secret)
    if bits < MIN_SECRET_BITS:
        raise RegistryError(
            f"update key in {where} holds about {bits:.0f} bits of randomness; "
            f"{MIN_SECRET_BITS} are needed: {how}"
        )


def generate_ed25519(out: Path) -> tuple[Path, Path]:
    """Write a new pair to ``out``: ``update.key`` (private, 0600) and ``update.pub`` (0644).

    Refuses to overwrite an existing key.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    private = Ed25519PrivateKey.generate()
    priv_path, pub_path = out / "update.key", out / "update.pub"
    for target in (priv_path, pub_path):
        if target.exists():
            raise RegistryError(f"{target} exists; remove it first or choose another --out")
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    pub = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    for target, data, mode in ((priv_path, pem, 0o600), (pub_path, pub, 0o644)):
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        target.chmod(mode)  # whatever the umask did
    return priv_path, pub_path


def _pem_private(text: bytes, where: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(text, password=None)
    except (ValueError, TypeError) as exc:
        raise RegistryError(
            f"{where} is not a readable unencrypted PEM private key ({exc})"
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise RegistryError(
            f"{where} holds a {type(key).__name__}; only Ed25519 keys sign announcements "
            "(`stream-rnn models keygen --out DIR`)"
        )
    return key


def _pem_public(text: bytes, where: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(text)
    except (ValueError, TypeError) as exc:
        raise RegistryError(f"{where} is not a readable PEM public key ({exc})") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise RegistryError(
            f"{where} holds a {type(key).__name__}; only Ed25519 keys verify announcements"
        )
    return key
