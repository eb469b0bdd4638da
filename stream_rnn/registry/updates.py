"""Model-update announcements: the signed message that tells workers to swap weights.

The registry announces its production version on a compacted Kafka topic
(``stream-rnn.model-updates``, one partition, record key ``b"production"``), so the topic
always holds the current announcement and a worker that starts late reads it from there.
The message points at a registry version directory; it carries the sha256 of the weights and
of the manifest, a summary of the architecture, the requested state policy and, when the
publisher has a key, an HMAC-SHA256 signature over everything else.

A worker runs `verify_update` off its hot path (in a thread; nothing here touches asyncio):
it checks the signature, loads and verifies the checkpoint, checks that the new model can
serve the same task, and decides the effective policy (``keep`` only when the states of the
running model mean the same thing to the new one).

Example::

    update = sign(build_update(registry.path(version), policy="keep"), key)
    publish_update("127.0.0.1:9092", update)
    ...
    update = read_current_update("127.0.0.1:9092")      # in a worker thread
    verified = verify_update(update, key=key, current=running_manifest)
    # swap in verified.model, applying verified.policy (verified.note says why it changed)
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import math
import re
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient
from kafka.errors import KafkaError

from stream_rnn.model.exceptions import WeightsError
from stream_rnn.model.network import RecurrentModel
from stream_rnn.registry.checkpoint import (
    MANIFEST_FILE,
    Manifest,
    load_checkpoint,
    read_manifest,
)
from stream_rnn.registry.exceptions import (
    AnnouncementError,
    CheckpointError,
    RegistryError,
    RejectReason,
    UpdateRejected,
)
from stream_rnn.stream.exceptions import StreamError
from stream_rnn.stream.topics import (
    ADMIN_TIMEOUT_MS,
    CONNECT_TIMEOUT_S,
    create_topics,
    partition_counts,
    wait_topics_ready,
)

__all__ = [
    "ARCHITECTURE_FIELDS",
    "POLICIES",
    "UPDATES_TOPIC",
    "UPDATE_KEY",
    "ModelUpdate",
    "Policy",
    "UpdateRejected",
    "VerifiedUpdate",
    "architecture_summary",
    "build_update",
    "canonical_json",
    "ensure_updates_topic",
    "load_update_key",
    "publish_update",
    "read_current_update",
    "sign",
    "verify_signature",
    "verify_update",
]

Policy = Literal["keep", "reset", "rewarm"]
POLICIES: tuple[str, ...] = get_args(Policy)
UPDATES_TOPIC = "stream-rnn.model-updates"
UPDATE_KEY = b"production"
MESSAGE_VERSION = 1
MIN_KEY_BYTES = 16
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
    """One announcement: "version V, at ``location``, is production now".

    ``signature`` is the hex HMAC-SHA256 of the canonical JSON of every other field, or None
    when the publisher had no key.

    Example::

        update = build_update(registry.path("m-1a2b"), policy="rewarm")
        assert ModelUpdate.from_bytes(update.to_bytes()) == update
    """

    v: int = MESSAGE_VERSION
    version: str
    location: str
    weights_sha256: str
    manifest_sha256: str
    architecture: dict[str, Any]
    policy: Policy
    published_at: float
    signature: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_bytes(self) -> bytes:
        return canonical_json(self.to_dict())

    def signed_payload(self) -> bytes:
        """The bytes the signature covers: every field but ``signature``, canonical JSON."""
        body = self.to_dict()
        del body["signature"]
        return canonical_json(body)

    @classmethod
    def from_bytes(cls, raw: bytes | None) -> ModelUpdate:
        """Parse and validate an announcement; `UpdateRejected` ``malformed`` on any defect."""
        if raw is None:
            raise _malformed("the record has no value (a tombstone)")
        try:
            data = json.loads(raw, parse_constant=_refuse_constant)
        except (ValueError, UnicodeDecodeError, TypeError) as exc:
            raise _malformed(f"not JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise _malformed(f"expected a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        if set(data) != names:
            raise _malformed(
                f"fields {sorted(data)} differ from the expected {sorted(names)} (missing "
                f"{sorted(names - set(data))}, unexpected {sorted(set(data) - names)})"
            )
        if data["v"] != MESSAGE_VERSION or isinstance(data["v"], bool):
            raise _malformed(f"v={data['v']!r} is not supported; this reader takes v=1")
        for name in ("version", "location"):
            if not isinstance(data[name], str) or not data[name]:
                raise _malformed(f"{name} must be a non-empty string, got {data[name]!r}")
        if not Path(data["location"]).is_absolute():
            raise _malformed(f"location {data['location']!r} must be an absolute path")
        for name in ("weights_sha256", "manifest_sha256"):
            if not isinstance(data[name], str) or not _HEX64.match(data[name]):
                raise _malformed(f"{name} must be 64 lowercase hex digits, got {data[name]!r}")
        _check_architecture(data["architecture"])
        if data["policy"] not in POLICIES:
            raise _malformed(f"policy {data['policy']!r} is not one of {', '.join(POLICIES)}")
        stamp = data["published_at"]
        if (
            isinstance(stamp, bool)
            or not isinstance(stamp, int | float)
            or not math.isfinite(stamp)
        ):
            raise _malformed(f"published_at must be a finite number, got {stamp!r}")
        sig = data["signature"]
        if sig is not None and (not isinstance(sig, str) or not _HEX64.match(sig)):
            raise _malformed("signature must be 64 lowercase hex digits or null")
        return cls(**{**data, "published_at": float(stamp)})


@dataclass(frozen=True)
class VerifiedUpdate:
    """An update that passed `verify_update`: the loaded model and the policy to apply.

    ``policy`` is the effective one; ``note`` says why it differs from the requested policy
    (None when it does not).
    """

    model: RecurrentModel
    manifest: Manifest
    update: ModelUpdate
    policy: Policy
    note: str | None = None


def build_update(
    version_dir: Path, *, policy: Policy, published_at: float | None = None
) -> ModelUpdate:
    """An unsigned announcement of the checkpoint in ``version_dir`` (a registry version)."""
    if policy not in POLICIES:
        raise RegistryError(f"policy {policy!r} is not one of {', '.join(POLICIES)}")
    where = Path(version_dir).resolve()
    manifest = read_manifest(where)
    return ModelUpdate(
        version=manifest.version,
        location=str(where),
        weights_sha256=manifest.weights_sha256,
        manifest_sha256=hashlib.sha256((where / MANIFEST_FILE).read_bytes()).hexdigest(),
        architecture=architecture_summary(manifest),
        policy=policy,
        published_at=time.time() if published_at is None else published_at,
    )


# ---------------------------------------------------------------------------------- signing
def load_update_key(path: Path) -> bytes:
    """The HMAC key in ``path``, surrounding whitespace stripped.

    Refuses a missing or non-regular file, one that group or others may read (the key signs
    what every worker will load), and keys shorter than 16 bytes.
    """
    where = Path(path)
    try:
        info = where.stat()
    except FileNotFoundError:
        raise RegistryError(
            f"update key file {where} does not exist; create one with "
            f"`head -c 32 /dev/urandom | base64 > {where} && chmod 600 {where}`"
        ) from None
    if not stat.S_ISREG(info.st_mode):
        raise RegistryError(f"update key file {where} is not a regular file")
    if info.st_mode & 0o077:
        raise RegistryError(
            f"update key file {where} is readable or writable by group/others (mode "
            f"{stat.S_IMODE(info.st_mode):03o}); restrict it with `chmod 600 {where}`"
        )
    key = where.read_bytes().strip()
    if not key:
        raise RegistryError(f"update key file {where} is empty; write a random key into it")
    if len(key) < MIN_KEY_BYTES:
        raise RegistryError(
            f"update key in {where} has {len(key)} bytes; use at least {MIN_KEY_BYTES} "
            "(`head -c 32 /dev/urandom | base64`)"
        )
    return key


def _mac(update: ModelUpdate, key: bytes) -> str:
    return hmac.new(key, update.signed_payload(), hashlib.sha256).hexdigest()


def sign(update: ModelUpdate, key: bytes) -> ModelUpdate:
    """A copy of ``update`` with its HMAC-SHA256 signature under ``key``."""
    return dataclasses.replace(update, signature=_mac(update, key))


def verify_signature(update: ModelUpdate, key: bytes) -> None:
    """Return if ``update`` is signed with ``key``; else `UpdateRejected` (constant time)."""
    if update.signature is None:
        raise UpdateRejected(
            reason="unsigned",
            detail=f"update {update.version} carries no signature but this worker has an "
            "update key; publish with --update-key-file (the same key)",
        )
    if not hmac.compare_digest(update.signature, _mac(update, key)):
        raise UpdateRejected(
            reason="bad_signature",
            detail=f"the signature of update {update.version} does not verify with this "
            "worker's key: it was signed with another key or altered after signing",
        )


# ------------------------------------------------------------------------------ verification
def verify_update(
    update: ModelUpdate,
    *,
    key: bytes | None,
    current: Manifest,
    device: str | torch.device = "cpu",
) -> VerifiedUpdate:
    """Check ``update`` against the files it names and the running model ``current``.

    With a ``key``, unsigned and wrongly signed updates are refused. The checkpoint at
    ``update.location`` must load (sha256, tensors, finite values), match the announced
    hashes and architecture, and serve ``current``'s task with a usable vocabulary and label
    set. Raises `UpdateRejected`; never touches asyncio, so it may run in a thread.
    """
    if key is not None:
        verify_signature(update, key)
    where = Path(update.location)
    try:
        raw_manifest = (where / MANIFEST_FILE).read_bytes()
    except OSError as exc:
        raise UpdateRejected(
            reason="unreadable",
            detail=f"cannot read {where / MANIFEST_FILE} ({exc.strerror or exc}); is the "
            "registry mounted at the same path on this worker?",
        ) from exc
    if hashlib.sha256(raw_manifest).hexdigest() != update.manifest_sha256:
        raise UpdateRejected(
            reason="checksum",
            detail=f"{where / MANIFEST_FILE} does not have the announced sha256 "
            f"{update.manifest_sha256[:12]}…; the registry copy was modified after publishing",
        )
    try:
        model, manifest = load_checkpoint(where, device=device)
    except CheckpointError as exc:
        raise UpdateRejected(reason=_reason_of(exc), detail=str(exc)) from exc
    if manifest.weights_sha256 != update.weights_sha256 or manifest.version != update.version:
        raise UpdateRejected(
            reason="checksum",
            detail=f"{where} holds version {manifest.version} with weights sha256 "
            f"{manifest.weights_sha256[:12]}…, not the announced {update.version} with "
            f"{update.weights_sha256[:12]}…",
        )
    summary = architecture_summary(manifest)
    if summary != update.architecture:
        raise UpdateRejected(
            reason="checksum",
            detail=f"the announced architecture of {update.version} differs from its "
            f"manifest's ({_differences(update.architecture, summary)}); re-publish it",
        )
    _check_compatible(manifest, summary, architecture_summary(current), current.version)
    policy, note = _effective_policy(update.policy, summary, current)
    return VerifiedUpdate(model=model, manifest=manifest, update=update, policy=policy, note=note)


def _reason_of(exc: CheckpointError) -> RejectReason:
    # load_checkpoint raises CheckpointError for everything: tensor checks come wrapped around
    # a WeightsError (finiteness, or names/shapes/dtype), a hash mismatch in its own words, and
    # the rest (missing weights, unreadable file, invalid model config) is unreadable.
    text = str(exc)
    if isinstance(exc.__cause__, WeightsError):
        return "non_finite" if "non-finite" in text else "shapes"
    if "does not match the manifest" in text:
        return "checksum"
    return "unreadable"


def _check_compatible(
    manifest: Manifest, new: dict[str, Any], cur: dict[str, Any], current_version: str
) -> None:
    def refuse(detail: str) -> UpdateRejected:
        return UpdateRejected(reason="incompatible", detail=f"update {manifest.version}: {detail}")

    if new["task"] != cur["task"]:
        raise refuse(
            f"is a {new['task']} model but this worker serves {cur['task']} ({current_version}); "
            "a worker cannot change task: start workers for the new task on their own topics"
        )
    if new["bidirectional"]:
        raise refuse("is bidirectional and cannot be streamed (it needs future tokens)")
    itos = manifest.vocab.get("itos") if isinstance(manifest.vocab, dict) else None
    if not isinstance(itos, list) or len(itos) != new["vocab_size"]:
        size = len(itos) if isinstance(itos, list) else "no"
        raise refuse(f"its vocabulary has {size} tokens but the model has {new['vocab_size']}")
    if new["task"] in ("classify", "tag"):
        labels = new["labels"]
        if (
            not isinstance(labels, list)
            or len(labels) != new["num_labels"]
            or len(set(labels)) != len(labels)
        ):
            raise refuse(
                f"its labels {labels!r} cannot be mapped onto the model's {new['num_labels']} "
                "outputs (the worker needs one distinct label name per output); re-export the "
                "checkpoint with its label set"
            )


def _effective_policy(
    requested: Policy, new: dict[str, Any], current: Manifest
) -> tuple[Policy, str | None]:
    if requested != "keep":
        return requested, None
    cur = architecture_summary(current)
    diff = _differences(
        {k: v for k, v in cur.items() if k != "labels"},
        {k: v for k, v in new.items() if k != "labels"},
    )
    if not diff:
        return "keep", None
    return "rewarm", (
        f"policy keep needs the architecture and vocabulary of the running model "
        f"{current.version}; {diff}, so the states are rewarmed instead"
    )


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    parts = []
    for name in sorted(set(old) | set(new)):
        if old.get(name) != new.get(name):
            if name == "vocab_sha256":
                parts.append("the vocabulary differs")
            elif name == "labels":
                parts.append("the labels differ")
            else:
                parts.append(f"{name} {old.get(name)!r} -> {new.get(name)!r}")
    return ", ".join(parts)


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


# ------------------------------------------------------------------------------------ Kafka
def ensure_updates_topic(
    bootstrap: str, topic: str = UPDATES_TOPIC, *, replication: int = 1
) -> None:
    """Create ``topic`` (compacted, one partition) unless it exists; safe to race."""
    try:
        admin = KafkaAdminClient(
            bootstrap_servers=bootstrap,
            client_id="stream-rnn-models",
            request_timeout_ms=ADMIN_TIMEOUT_MS,
            bootstrap_timeout_ms=int(CONNECT_TIMEOUT_S * 1000),
        )
    except KafkaError as err:
        raise AnnouncementError(
            f"cannot reach Kafka at {bootstrap} ({err}); start a broker (stream-rnn kafka up), "
            "pass --bootstrap HOST:PORT, or --no-announce to only update the registry"
        ) from err
    try:
        if topic not in partition_counts(admin, [topic]):
            configs = {"cleanup.policy": "compact"}
            if replication > 1:  # as the state topic: acks=all survives one broker down
                configs["min.insync.replicas"] = str(replication - 1)
            spec = {"num_partitions": 1, "replication_factor": replication, "configs": configs}
            create_topics(admin, {topic: spec})
            wait_topics_ready(admin, [topic], 20.0)
    except (KafkaError, StreamError) as err:
        raise AnnouncementError(
            f"Kafka at {bootstrap} could not describe or create topic {topic!r} ({err}); "
            "check the broker log and that this client may create topics"
        ) from err
    finally:
        admin.close()


def publish_update(
    bootstrap: str,
    update: ModelUpdate,
    topic: str = UPDATES_TOPIC,
    *,
    replication: int = 1,
    timeout_s: float = 30.0,
) -> int:
    """Announce ``update`` (key ``b"production"``, acks=all); return its offset.

    Creates the compacted topic if missing. Returns only once the broker acknowledged the
    record on all in-sync replicas; raises `AnnouncementError` otherwise.
    """
    ensure_updates_topic(bootstrap, topic, replication=replication)
    try:
        producer = KafkaProducer(
            bootstrap_servers=bootstrap,
            acks="all",
            enable_idempotence=True,
            client_id="stream-rnn-models",
            max_block_ms=int(timeout_s * 1000),
        )
    except KafkaError as err:
        raise AnnouncementError(f"cannot reach Kafka at {bootstrap} ({err})") from err
    try:
        meta = producer.send(topic, key=UPDATE_KEY, value=update.to_bytes()).get(timeout=timeout_s)
        producer.flush(timeout=timeout_s)
    except KafkaError as err:
        raise AnnouncementError(
            f"Kafka at {bootstrap} did not take the announcement of {update.version} on "
            f"{topic!r} ({err}); nothing was announced: check the broker and publish again"
        ) from err
    finally:
        producer.close(timeout=5)
    return int(meta.offset)


def read_current_update(
    bootstrap: str, topic: str = UPDATES_TOPIC, *, timeout_s: float = 30.0
) -> ModelUpdate | None:
    """The newest announcement on ``topic`` (read_committed, beginning to end), or None.

    None when the topic does not exist, is empty, or its newest record is a tombstone.
    A newest record that is not a valid announcement raises `UpdateRejected` ``malformed``.
    """
    try:
        consumer = KafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            allow_auto_create_topics=False,
            client_id="stream-rnn-models",
        )
    except KafkaError as err:
        raise AnnouncementError(f"cannot reach Kafka at {bootstrap} ({err})") from err
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            return None
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        end = consumer.end_offsets(tps)
        # The last record of the key in offset order wins, as compaction keeps it; the key
        # hashes to one partition, so comparing timestamps across partitions only matters
        # for records someone wrote to an explicit partition.
        last: dict[int, Any] = {}
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < end[tp] for tp in tps):
            if time.monotonic() > deadline:
                raise AnnouncementError(
                    f"could not read {topic!r} at {bootstrap} to its end within {timeout_s:.0f}s"
                )
            for records in consumer.poll(timeout_ms=200).values():
                for rec in records:
                    if rec.key == UPDATE_KEY:
                        last[rec.partition] = rec
    except KafkaError as err:
        raise AnnouncementError(f"cannot read {topic!r} at {bootstrap} ({err})") from err
    finally:
        consumer.close()
    if not last:
        return None
    newest = max(last.values(), key=lambda rec: rec.timestamp)
    return None if newest.value is None else ModelUpdate.from_bytes(newest.value)
