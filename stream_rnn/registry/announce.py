"""The model-update announcement: its format (v=2), its signature and what makes it acceptable.

An announcement says "version V of registry R is production now, announced on topic T as the
N-th announcement". It names a version id, never a path: each worker resolves it in its own
registry. It carries the sha256 of the weights and of the manifest, a summary of the
architecture, the requested state policy, a sequence number ``seq`` issued under the
registry's lock (strictly increasing), the domain (``registry_id`` and ``topic``), the
signature algorithm ``alg`` and the signature over every other field (canonical JSON of the
values exactly as received).

A worker accepts an announcement only if (`check_authentic`): it is signed with the
algorithm and key the worker holds (unsigned only with ``--allow-unsigned-updates``), its
domain is the worker's registry and topic, and its ``seq`` is above every one seen before
(else ``stale``: a replay).

Example::

    update = sign(build_update(registry, version, policy="keep", seq=7, topic=topic), key)
    again = ModelUpdate.from_bytes(update.to_bytes())
    check_authentic(again, key=key, registry_id=registry.identity(), topic=topic)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

from stream_rnn.registry.checkpoint import Manifest, read_manifest_with_sha256
from stream_rnn.registry.exceptions import RegistryError, UpdateRejected
from stream_rnn.registry.keys import ALGORITHMS, UpdateKey, as_update_key
from stream_rnn.registry.versions import check_version_id

if TYPE_CHECKING:
    from stream_rnn.registry.versions import Registry

Policy = Literal["keep", "reset", "rewarm"]
POLICIES: tuple[str, ...] = get_args(Policy)
UPDATES_TOPIC = "stream-rnn.model-updates"
MESSAGE_VERSION = 2
MAX_MESSAGE_BYTES = 64 * 1024
ARCHITECTURE_FIELDS: tuple[str, ...] = (
    "task",
    "cell",
    "num_layers",
    "hidden_size",
    "embed_dim",
    "vocab_size",
    "num_labels",
    "bidirectional",
    "vocab_sha256",
    "labels",
)
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_SIGNATURE = {
    "hmac-sha256": re.compile(r"^[0-9a-f]{64}$"),
    "ed25519": re.compile(r"^[0-9a-f]{128}$"),
}
_ID = re.compile(r"^[0-9a-f]{32}$")
_INT_FIELDS = ("num_layers", "hidden_size", "embed_dim", "vocab_size", "num_labels")


def canonical_json(value: Any) -> bytes:
    """The one byte form of ``value`` that signatures and hashes are computed over."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def architecture_summary(manifest: Manifest) -> dict[str, Any]:
    """What decides whether states and outputs of two models are interchangeable."""
    cfg = manifest.model_config
    return {
        "task": cfg.get("task"),
        "cell": cfg.get("cell"),
        "num_layers": cfg.get("num_layers", 1),
        "hidden_size": cfg.get("hidden_size"),
        "embed_dim": cfg.get("embed_dim"),
        "vocab_size": cfg.get("vocab_size"),
        "num_labels": cfg.get("num_labels", 0),
        "bidirectional": bool(cfg.get("bidirectional", False)),
        "vocab_sha256": hashlib.sha256(canonical_json(manifest.vocab)).hexdigest(),
        "labels": list(manifest.labels) if manifest.labels is not None else None,
    }


@dataclass(frozen=True, kw_only=True)
class ModelUpdate:
    """One announcement: "version V of registry R is production, announcement number seq".

    ``signature`` is the hex signature (``alg``) of the canonical JSON of every other field, or
    None (and ``alg`` None) when the publisher had no key. Values stay exactly as parsed (an
    integer ``published_at`` stays an integer), so the signature is checked over what was sent.

    Example::

        update = build_update(registry, "m-1a2b", policy="rewarm", seq=3, topic=UPDATES_TOPIC)
        assert ModelUpdate.from_bytes(update.to_bytes()) == update
    """

    v: int = MESSAGE_VERSION
    version: str
    seq: int
    registry_id: str
    topic: str
    weights_sha256: str
    manifest_sha256: str
    architecture: dict[str, Any]
    policy: Policy
    published_at: float
    alg: str | None = None
    signature: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_bytes(self) -> bytes:
        return canonical_json(self.to_dict())

    def signed_payload(self) -> bytes:
        """The bytes the signature covers: every field but ``signature`` (``alg`` included)."""
        body = self.to_dict()
        del body["signature"]
        return canonical_json(body)

    @classmethod
    def from_bytes(cls, raw: bytes | None) -> ModelUpdate:
        """Parse and validate an announcement; `UpdateRejected` ``malformed`` on any defect."""
        if raw is None:
            raise _malformed("the record has no value (a tombstone)")
        if len(raw) > MAX_MESSAGE_BYTES:
            raise _malformed(f"{len(raw)} bytes, over the {MAX_MESSAGE_BYTES} an update may have")
        try:
            data = json.loads(raw, parse_constant=_refuse_constant)
        except (ValueError, UnicodeDecodeError, TypeError) as exc:
            raise _malformed(f"not JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise _malformed(f"expected a JSON object, got {type(data).__name__}")
        if data.get("v") != MESSAGE_VERSION or isinstance(data.get("v"), bool):
            raise _malformed(
                f"v={data.get('v')!r} is not supported; this worker takes v={MESSAGE_VERSION} "
                "(sequence-numbered, signed for one registry and topic). Announce the version "
                "again with an up-to-date `stream-rnn models promote VERSION`"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        if set(data) != names:
            raise _malformed(
                f"fields {sorted(data)} differ from the expected {sorted(names)} (missing "
                f"{sorted(names - set(data))}, unexpected {sorted(set(data) - names)})"
            )
        _check_fields(data)
        return cls(**data)


def _check_fields(data: dict[str, Any]) -> None:
    try:
        check_version_id(data["version"])
    except RegistryError as exc:
        raise _malformed(f"version: {exc}") from exc
    seq = data["seq"]
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
        raise _malformed(f"seq must be a positive integer, got {seq!r}")
    if not isinstance(data["registry_id"], str) or not _ID.match(data["registry_id"]):
        raise _malformed(f"registry_id must be 32 hex digits, got {data['registry_id']!r}")
    if not isinstance(data["topic"], str) or not data["topic"]:
        raise _malformed(f"topic must be a non-empty string, got {data['topic']!r}")
    for name in ("weights_sha256", "manifest_sha256"):
        if not isinstance(data[name], str) or not _HEX64.match(data[name]):
            raise _malformed(f"{name} must be 64 lowercase hex digits, got {data[name]!r}")
    _check_architecture(data["architecture"])
    if data["policy"] not in POLICIES:
        raise _malformed(f"policy {data['policy']!r} is not one of {', '.join(POLICIES)}")
    stamp = data["published_at"]
    if isinstance(stamp, bool) or not isinstance(stamp, int | float) or not math.isfinite(stamp):
        raise _malformed(f"published_at must be a finite number, got {stamp!r}")
    alg, sig = data["alg"], data["signature"]
    if (alg is None) != (sig is None):
        raise _malformed("alg and signature must both be given or both be null")
    if alg is not None and alg not in ALGORITHMS:
        raise _malformed(f"alg {alg!r} is not one of {', '.join(ALGORITHMS)}")
    if sig is not None and (not isinstance(sig, str) or not _SIGNATURE[alg].match(sig)):
        raise _malformed(f"signature is not a {alg} signature in lowercase hex")


def build_update(
    registry: Registry,
    version: str,
    *,
    policy: Policy,
    seq: int,
    topic: str = UPDATES_TOPIC,
    published_at: float | None = None,
) -> ModelUpdate:
    """An unsigned announcement of ``version`` of ``registry`` (sequence number ``seq``)."""
    if policy not in POLICIES:
        raise RegistryError(f"policy {policy!r} is not one of {', '.join(POLICIES)}")
    where = registry.path(version)
    manifest, manifest_sha256 = read_manifest_with_sha256(where)  # one read, hashed as parsed
    return ModelUpdate(
        version=manifest.version,
        seq=seq,
        registry_id=registry.identity(),
        topic=topic,
        weights_sha256=manifest.weights_sha256,
        manifest_sha256=manifest_sha256,
        architecture=architecture_summary(manifest),
        policy=policy,
        published_at=time.time() if published_at is None else published_at,
    )


def sign(update: ModelUpdate, key: bytes | UpdateKey) -> ModelUpdate:
    """A copy of ``update`` signed with ``key`` (its algorithm recorded in ``alg``)."""
    k = as_update_key(key)
    named = dataclasses.replace(update, alg=k.alg, signature=None)
    return dataclasses.replace(named, signature=k.sign(named.signed_payload()))


def verify_signature(update: ModelUpdate, key: bytes | UpdateKey) -> None:
    """Return if ``update`` is signed by ``key`` with ``key``'s algorithm; else `UpdateRejected`."""
    k = as_update_key(key)
    if update.signature is None:
        raise UpdateRejected(
            reason="unsigned",
            detail=f"update {update.version} carries no signature but this worker has an "
            "update key; publish with --update-key-file (the matching key)",
        )
    if update.alg != k.alg:
        raise UpdateRejected(
            reason="bad_signature",
            detail=f"update {update.version} is signed with {update.alg} but this worker's key "
            f"({k.source}) is {k.alg}: one algorithm per deployment, publish with its key",
        )
    if not k.verify(update.signed_payload(), update.signature):
        raise UpdateRejected(
            reason="bad_signature",
            detail=f"the signature of update {update.version} does not verify with this "
            "worker's key: it was signed with another key or altered after signing",
        )


def check_authentic(
    update: ModelUpdate,
    *,
    key: bytes | UpdateKey | None,
    registry_id: str,
    topic: str,
    allow_unsigned: bool = False,
    after_seq: int = 0,
) -> None:
    """`UpdateRejected` unless ``update`` is signed (or unsigned ones are allowed), for this
    registry and topic, and fresher than ``after_seq`` (else ``stale``)."""
    if key is not None:
        verify_signature(update, key)
    elif not allow_unsigned:
        raise UpdateRejected(
            reason="unsigned",
            detail=f"update {update.version} cannot be verified: this worker has no update key; "
            "give it --update-key-file (or, knowingly, --allow-unsigned-updates)",
        )
    if update.registry_id != registry_id or update.topic != topic:
        raise UpdateRejected(
            reason="domain",
            detail=f"update {update.version} was announced for registry {update.registry_id} on "
            f"{update.topic!r}, but this worker follows registry {registry_id} on {topic!r}: "
            "another registry or environment; check --registry and the updates topic",
        )
    if update.seq <= after_seq:
        raise UpdateRejected(
            reason="stale",
            detail=f"update {update.version} has sequence number {update.seq}, not above "
            f"{after_seq} already seen: an old announcement sent again (a replay)",
        )


def _malformed(detail: str) -> UpdateRejected:
    return UpdateRejected(reason="malformed", detail=f"model-update message: {detail}")


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _check_architecture(arch: Any) -> None:
    if not isinstance(arch, dict) or set(arch) != set(ARCHITECTURE_FIELDS):
        got = sorted(arch) if isinstance(arch, dict) else type(arch).__name__
        raise _malformed(f"architecture must have exactly {list(ARCHITECTURE_FIELDS)}, got {got}")
    for name in ("task", "cell"):
        if not isinstance(arch[name], str):
            raise _malformed(f"architecture.{name} must be a string, got {arch[name]!r}")
    for name in _INT_FIELDS:
        if isinstance(arch[name], bool) or not isinstance(arch[name], int):
            raise _malformed(f"architecture.{name} must be an integer, got {arch[name]!r}")
    if not isinstance(arch["bidirectional"], bool):
        raise _malformed("architecture.bidirectional must be true or false")
    if not isinstance(arch["vocab_sha256"], str) or not _HEX64.match(arch["vocab_sha256"]):
        raise _malformed("architecture.vocab_sha256 must be 64 lowercase hex digits")
    labels = arch["labels"]
    if labels is not None and (
        not isinstance(labels, list) or not all(isinstance(x, str) for x in labels)
    ):
        raise _malformed("architecture.labels must be a list of strings or null")
