"""Model-update announcements: wire format, signing, key files, verification and policies.

Every rejection reason is produced from real files in a real registry: tampered bytes,
re-shaped tensors, NaN. Announcements name a version id, resolved in the worker's registry.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from stream_rnn.model import ModelConfig, RecurrentModel
from stream_rnn.registry import Manifest, Registry, UpdateRejected, read_manifest, save_checkpoint
from stream_rnn.registry.checkpoint import sha256_file
from stream_rnn.registry.exceptions import RegistryError
from stream_rnn.registry.updates import (
    ModelUpdate,
    build_update,
    canonical_json,
    load_update_key,
    sign,
    verify_signature,
    verify_update,
)
from stream_rnn.train.vocab import Vocab

VOCAB = Vocab.build(["abcdefgh"], "char")
OTHER_VOCAB = Vocab.build(["abcdefgz"], "char")
KEY = b"Xq3vR8pL2mN7kT4wY9zB6cF1hJ5sD0gA"
_SEQ = itertools.count(1)


def _save(
    out: Path,
    *,
    task: str = "next-token",
    hidden: int = 8,
    vocab: Vocab = VOCAB,
    labels: list[str] | None = None,
    num_labels: int = 0,
    bidirectional: bool = False,
    seed: int = 0,
) -> Path:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        task=task,  # type: ignore[arg-type]
        cell="gru",
        vocab_size=len(vocab),
        embed_dim=4,
        hidden_size=hidden,
        num_labels=num_labels,
        bidirectional=bidirectional,
    )
    save_checkpoint(out, RecurrentModel(cfg).eval(), vocab=vocab.to_dict(), labels=labels)
    return out


def _rewrite(where: Path, mutate: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Change the tensors and re-record their sha256: only the tensor checks can catch it."""
    tensors = load_file(str(where / "weights.safetensors"))
    mutate(tensors)
    save_file(tensors, str(where / "weights.safetensors"))
    manifest = json.loads((where / "manifest.json").read_text())
    manifest["weights_sha256"] = sha256_file(where / "weights.safetensors")
    (where / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def current(tmp_path: Path) -> Manifest:
    return read_manifest(_save(tmp_path / "current", seed=0))


def _reg(where: Path) -> Registry:
    return Registry(where.parent / "registry")


def _build(where: Path, *, policy: str = "keep", **kw: object) -> ModelUpdate:
    """Add the checkpoint at ``where`` to the registry next to it; announce it (unsigned)."""
    reg = _reg(where)
    version = reg.add(where).version
    return build_update(reg, version, policy=policy, seq=next(_SEQ), **kw)  # type: ignore[arg-type]


def _stored(update: ModelUpdate, where: Path) -> Path:
    """The registry's copy of the announced version (what the worker loads)."""
    return _reg(where).path(update.version)


def _verify(update: ModelUpdate, where: Path, current: Manifest, key: bytes | None = None):
    return verify_update(
        update, key=key, registry=_reg(where), current=current, allow_unsigned=key is None
    )


def _rejected(
    update: ModelUpdate, current: Manifest, key: bytes | None = None, *, where: Path
) -> UpdateRejected:
    with pytest.raises(UpdateRejected) as info:
        _verify(update, where, current, key)
    return info.value


# ------------------------------------------------------------------------------ wire format
def test_round_trip_in_canonical_json(tmp_path: Path) -> None:
    where = _save(tmp_path / "m")
    update = _build(where, published_at=1700000000.5)
    raw = update.to_bytes()
    assert raw == canonical_json(json.loads(raw)) and b" " not in raw
    back = ModelUpdate.from_bytes(raw)
    assert back == update and back.v == 2 and back.signature is None and back.alg is None
    manifest = read_manifest(where)
    assert back.version == manifest.version and back.seq >= 1
    assert back.registry_id == _reg(where).identity() and back.topic == "stream-rnn.model-updates"
    assert "location" not in json.loads(raw)  # no paths on the wire
    assert back.weights_sha256 == manifest.weights_sha256
    assert back.architecture == {
        "task": "next-token",
        "cell": "gru",
        "num_layers": 1,
        "hidden_size": 8,
        "embed_dim": 4,
        "vocab_size": len(VOCAB),
        "num_labels": 0,
        "bidirectional": False,
        "vocab_sha256": back.architecture["vocab_sha256"],
        "labels": None,
    }
    with pytest.raises(RegistryError, match="policy 'later' is not one of keep, reset, rewarm"):
        _build(where, policy="later")


def _edited(update: ModelUpdate, **changes: object) -> bytes:
    data = update.to_dict()
    for name, value in changes.items():
        if value is ...:
            del data[name]
        else:
            data[name] = value
    return json.dumps(data).encode()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda u: b"{not json", "not JSON"),
        (lambda u: b"\xff\xfe", "not JSON"),
        (lambda u: b"[1, 2]", "expected a JSON object, got list"),
        (lambda u: None, "no value"),
        (lambda u: b" " * 70000, "over the 65536"),
        (lambda u: _edited(u, policy=...), "missing \\['policy'\\]"),
        (lambda u: _edited(u, extra=1), "unexpected \\['extra'\\]"),
        (lambda u: _edited(u, location="/srv/registry/x"), "unexpected \\['location'\\]"),
        (lambda u: _edited(u, v=1), "v=1 is not supported; this worker takes v=2"),
        (lambda u: _edited(u, policy="maybe"), "policy 'maybe' is not one of"),
        (lambda u: _edited(u, version="../../etc"), "cannot name a registry directory"),
        (lambda u: _edited(u, seq=0), "seq must be a positive integer"),
        (lambda u: _edited(u, seq=True), "seq must be a positive integer"),
        (lambda u: _edited(u, registry_id="x"), "registry_id must be 32 hex"),
        (lambda u: _edited(u, weights_sha256="abc"), "weights_sha256 must be 64"),
        (lambda u: _edited(u, signature=7, alg="hmac-sha256"), "signature is not a hmac"),
        (lambda u: _edited(u, alg="none", signature="0" * 64), "alg 'none' is not one of"),
        (lambda u: _edited(u, alg="ed25519"), "both be given or both be null"),
        (lambda u: _edited(u, published_at=float("nan")), "NaN is not a JSON number"),
        (lambda u: _edited(u, published_at="now"), "published_at must be a finite number"),
        (lambda u: _edited(u, architecture={"task": "x"}), "architecture must have exactly"),
        (
            lambda u: _edited(u, architecture={**u.architecture, "hidden_size": "8"}),
            "architecture.hidden_size must be an integer",
        ),
    ],
)
def test_malformed_messages_are_rejected(tmp_path: Path, edit, message: str) -> None:
    update = _build(_save(tmp_path / "m"), policy="reset")
    with pytest.raises(UpdateRejected, match=message) as info:
        ModelUpdate.from_bytes(edit(update))
    assert info.value.reason == "malformed"


# ---------------------------------------------------------------------------------- signing
def test_signatures_verify_only_with_the_same_key_and_untouched_fields(tmp_path: Path) -> None:
    signed = sign(_build(_save(tmp_path / "m")), KEY)
    assert signed.signature is not None and len(signed.signature) == 64
    assert signed.alg == "hmac-sha256"
    verify_signature(signed, KEY)
    verify_signature(ModelUpdate.from_bytes(signed.to_bytes()), KEY)  # survives the wire
    with pytest.raises(UpdateRejected, match="another key or altered") as info:
        verify_signature(signed, b"x" * 32)
    assert info.value.reason == "bad_signature"
    for change in ({"seq": signed.seq + 100}, {"topic": "other"}, {"registry_id": "0" * 32}):
        moved = dataclasses.replace(signed, **change)  # type: ignore[arg-type]
        with pytest.raises(UpdateRejected) as info:
            verify_signature(moved, KEY)
        assert info.value.reason == "bad_signature"
    unsigned = dataclasses.replace(signed, signature=None, alg=None)
    with pytest.raises(UpdateRejected, match="carries no signature") as info:
        verify_signature(unsigned, KEY)
    assert info.value.reason == "unsigned"


def test_an_integer_published_at_verifies(tmp_path: Path) -> None:
    # another publisher (or a JSON library) writes a whole-second stamp as an integer: the
    # signature covers the value as sent, so the worker must not turn it into 1700000000.0
    signed = sign(_build(_save(tmp_path / "m"), published_at=1700000000), KEY)
    raw = signed.to_bytes()
    assert b'"published_at":1700000000,' in raw
    verify_signature(ModelUpdate.from_bytes(raw), KEY)


def test_update_key_files_must_be_private_and_random(tmp_path: Path) -> None:
    path = tmp_path / "update.key"
    path.write_bytes(b"  " + KEY + b"\n")
    path.chmod(0o600)
    key = load_update_key(path)
    assert key.alg == "hmac-sha256" and key.secret == KEY
    path.chmod(0o640)
    with pytest.raises(RegistryError, match=r"by group/others \(mode 640\).*chmod 600"):
        load_update_key(path)
    path.chmod(0o600)
    path.write_bytes(b"short\n")
    with pytest.raises(RegistryError, match="has 5 bytes; use at least 32"):
        load_update_key(path)
    path.write_bytes(b" \n")
    with pytest.raises(RegistryError, match="is empty"):
        load_update_key(path)
    with pytest.raises(RegistryError, match="does not exist; create"):
        load_update_key(tmp_path / "missing.key")


# ----------------------------------------------------------------------------- verification
def test_a_good_signed_update_is_loaded(tmp_path: Path, current: Manifest) -> None:
    where = _save(tmp_path / "new", seed=1)
    update = sign(_build(where), KEY)
    reg = _reg(where)
    # the worker runs this in a thread, off its event loop
    with ThreadPoolExecutor(1) as pool:
        verified = pool.submit(
            verify_update, update, key=KEY, registry=reg, current=current
        ).result()
    assert verified.policy == "keep" and verified.note is None
    assert verified.manifest.version == update.version and verified.update == update
    assert not verified.model.training
    expected = load_file(str(where / "weights.safetensors"))
    assert torch.equal(verified.model.state_dict()["decoder.bias"], expected["decoder.bias"])
    # no key: unsigned updates are accepted only when explicitly allowed
    unsigned = _build(where, policy="reset")
    assert _verify(unsigned, where, current).policy == "reset"
    with pytest.raises(UpdateRejected, match="--allow-unsigned-updates") as info:
        verify_update(unsigned, key=None, registry=reg, current=current)
    assert info.value.reason == "unsigned"


def test_signature_reasons(tmp_path: Path, current: Manifest) -> None:
    where = _save(tmp_path / "new", seed=1)
    update = _build(where)
    assert _rejected(update, current, key=KEY, where=where).reason == "unsigned"
    wrong = sign(update, b"z" * 32)
    assert _rejected(wrong, current, key=KEY, where=where).reason == "bad_signature"


def test_unreadable(tmp_path: Path, current: Manifest) -> None:
    where = _save(tmp_path / "new", seed=1)
    update = _build(where)
    stored = _stored(update, where)
    (stored / "weights.safetensors").unlink()
    err = _rejected(update, current, where=where)
    assert err.reason == "unreadable" and "weights.safetensors is missing" in str(err)
    gone = dataclasses.replace(update, version="m-not-here")
    err = _rejected(gone, current, where=where)
    assert err.reason == "unreadable" and "is not in the registry" in str(err)
    # a weights file that is not safetensors at all (with a matching recorded sha256)
    (stored / "weights.safetensors").write_bytes(b"\x00" * 64)
    manifest = json.loads((stored / "manifest.json").read_text())
    manifest["weights_sha256"] = sha256_file(stored / "weights.safetensors")
    (stored / "manifest.json").write_text(json.dumps(manifest))
    fresh = build_update(_reg(where), update.version, policy="keep", seq=next(_SEQ))
    err = _rejected(fresh, current, where=where)
    assert err.reason == "unreadable" and "not a readable safetensors file" in str(err)


def test_checksum(tmp_path: Path, current: Manifest) -> None:
    where = _save(tmp_path / "new", seed=1)
    update = _build(where)
    stored = _stored(update, where)
    weights = stored / "weights.safetensors"
    pristine = weights.read_bytes()
    data = bytearray(pristine)
    data[-5] ^= 0x01  # one bit of one weight
    weights.write_bytes(bytes(data))
    err = _rejected(update, current, where=where)
    assert err.reason == "checksum" and "does not match the manifest" in str(err)
    weights.write_bytes(pristine)
    _verify(update, where, current)
    # the manifest changed after the announcement
    manifest = json.loads((stored / "manifest.json").read_text())
    manifest["metrics"] = {"acc": 1.0}
    (stored / "manifest.json").write_text(json.dumps(manifest))
    err = _rejected(update, current, where=where)
    assert err.reason == "checksum" and "does not match the manifest sha256 announced" in str(err)
    # an announcement whose own fields disagree with the files it names
    fresh = build_update(_reg(where), update.version, policy="keep", seq=next(_SEQ))
    wrong = dataclasses.replace(fresh, weights_sha256="0" * 64)
    assert _rejected(wrong, current, where=where).reason == "checksum"
    arch = {**fresh.architecture, "hidden_size": 99}
    err = _rejected(dataclasses.replace(fresh, architecture=arch), current, where=where)
    assert err.reason == "checksum" and "hidden_size 99 -> 8" in str(err)


def _tampered(where: Path, mutate: Callable[[dict[str, torch.Tensor]], None]) -> ModelUpdate:
    update = _build(where)
    _rewrite(_stored(update, where), mutate)
    return build_update(_reg(where), update.version, policy="keep", seq=next(_SEQ))


def test_shapes(tmp_path: Path, current: Manifest) -> None:
    def narrower(tensors: dict[str, torch.Tensor]) -> None:
        tensors["decoder.bias"] = tensors["decoder.bias"][:-1].clone()

    where = _save(tmp_path / "new", seed=1)
    err = _rejected(_tampered(where, narrower), current, where=where)
    assert err.reason == "shapes" and "'decoder.bias' has shape" in str(err)
    where = _save(tmp_path / "new2", seed=2)
    err = _rejected(_tampered(where, lambda t: t.pop("decoder.bias")), current, where=where)
    assert err.reason == "shapes" and "missing tensors ['decoder.bias']" in str(err)


def test_non_finite(tmp_path: Path, current: Manifest) -> None:
    def poison(tensors: dict[str, torch.Tensor]) -> None:
        tensors["rnn.weight_hh_l0"][0, 0] = float("nan")

    where = _save(tmp_path / "new", seed=1)
    err = _rejected(_tampered(where, poison), current, where=where)
    assert err.reason == "non_finite" and "non-finite" in str(err)


def test_incompatible(tmp_path: Path, current: Manifest) -> None:
    other_task = _save(tmp_path / "cls", task="classify", num_labels=2, labels=["x", "y"])
    err = _rejected(_build(other_task), current, where=other_task)
    assert err.reason == "incompatible"
    assert "is a classify model but this worker serves next-token" in str(err)

    classifier = read_manifest(other_task)
    unmapped = _save(tmp_path / "cls3", task="classify", num_labels=3, labels=["x", "y"], seed=2)
    err = _rejected(_build(unmapped, policy="reset"), classifier, where=unmapped)
    assert err.reason == "incompatible"
    assert "labels ['x', 'y'] cannot be mapped onto the model's 3 outputs" in str(err)


# --------------------------------------------------------------------------------- policies
def test_keep_needs_the_same_architecture_and_vocabulary(tmp_path: Path, current: Manifest) -> None:
    wide = _save(tmp_path / "wide", hidden=16, seed=1)
    wider = _build(wide)
    verified = _verify(wider, wide, current)
    assert verified.policy == "rewarm" and verified.note is not None
    assert "hidden_size 8 -> 16" in verified.note and current.version in verified.note

    voc = _save(tmp_path / "voc", vocab=OTHER_VOCAB, seed=1)
    verified = _verify(_build(voc), voc, current)
    assert verified.policy == "rewarm" and "the vocabulary differs" in str(verified.note)

    # explicit reset and rewarm are honoured whatever changed
    for policy in ("reset", "rewarm"):
        update = dataclasses.replace(wider, policy=policy)
        assert _verify(update, wide, current).policy == policy


def test_new_label_names_do_not_prevent_keep(tmp_path: Path) -> None:
    old = read_manifest(_save(tmp_path / "a", task="classify", num_labels=2, labels=["x", "y"]))
    renamed = _save(tmp_path / "b", task="classify", num_labels=2, labels=["no", "yes"], seed=3)
    verified = _verify(_build(renamed), renamed, old)
    assert verified.policy == "keep" and verified.manifest.labels == ["no", "yes"]
