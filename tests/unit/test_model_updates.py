"""Model-update announcements: wire format, signing, key files, verification and policies.

Every rejection reason is produced from real files: tampered bytes, re-shaped tensors, NaN.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from stream_rnn.model import ModelConfig, RecurrentModel
from stream_rnn.registry import Manifest, UpdateRejected, read_manifest, save_checkpoint
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
KEY = b"k" * 32


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


def _rejected(update: ModelUpdate, current: Manifest, key: bytes | None = None) -> UpdateRejected:
    with pytest.raises(UpdateRejected) as info:
        verify_update(update, key=key, current=current)
    return info.value


# ------------------------------------------------------------------------------ wire format
def test_round_trip_in_canonical_json(tmp_path: Path) -> None:
    where = _save(tmp_path / "m")
    update = build_update(where, policy="keep", published_at=1700000000.5)
    raw = update.to_bytes()
    assert raw == canonical_json(json.loads(raw)) and b" " not in raw
    back = ModelUpdate.from_bytes(raw)
    assert back == update and back.v == 1 and back.signature is None
    manifest = read_manifest(where)
    assert back.location == str(where.resolve()) and back.version == manifest.version
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
        build_update(where, policy="later")  # type: ignore[arg-type]


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
        (lambda u: _edited(u, policy=...), "missing \\['policy'\\]"),
        (lambda u: _edited(u, extra=1), "unexpected \\['extra'\\]"),
        (lambda u: _edited(u, v=2), "v=2 is not supported"),
        (lambda u: _edited(u, policy="maybe"), "policy 'maybe' is not one of"),
        (lambda u: _edited(u, location="runs/registry/x"), "must be an absolute path"),
        (lambda u: _edited(u, weights_sha256="abc"), "weights_sha256 must be 64"),
        (lambda u: _edited(u, signature=7), "signature must be"),
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
    update = build_update(_save(tmp_path / "m"), policy="reset")
    with pytest.raises(UpdateRejected, match=message) as info:
        ModelUpdate.from_bytes(edit(update))
    assert info.value.reason == "malformed"


# ---------------------------------------------------------------------------------- signing
def test_signatures_verify_only_with_the_same_key_and_untouched_fields(tmp_path: Path) -> None:
    signed = sign(build_update(_save(tmp_path / "m"), policy="keep"), KEY)
    assert signed.signature is not None and len(signed.signature) == 64
    verify_signature(signed, KEY)
    verify_signature(ModelUpdate.from_bytes(signed.to_bytes()), KEY)  # survives the wire
    with pytest.raises(UpdateRejected, match="another key or altered") as info:
        verify_signature(signed, b"x" * 32)
    assert info.value.reason == "bad_signature"
    moved = dataclasses.replace(signed, location="/elsewhere")
    with pytest.raises(UpdateRejected) as info:
        verify_signature(moved, KEY)
    assert info.value.reason == "bad_signature"
    unsigned = dataclasses.replace(signed, signature=None)
    with pytest.raises(UpdateRejected, match="carries no signature") as info:
        verify_signature(unsigned, KEY)
    assert info.value.reason == "unsigned"


def test_update_key_files_must_be_private_and_long_enough(tmp_path: Path) -> None:
    path = tmp_path / "update.key"
    path.write_bytes(b"  " + KEY + b"\n")
    path.chmod(0o600)
    assert load_update_key(path) == KEY
    path.chmod(0o644)
    with pytest.raises(RegistryError, match=r"by group/others \(mode 644\).*chmod 600"):
        load_update_key(path)
    path.chmod(0o600)
    path.write_bytes(b"short\n")
    with pytest.raises(RegistryError, match="has 5 bytes; use at least 16"):
        load_update_key(path)
    path.write_bytes(b" \n")
    with pytest.raises(RegistryError, match="is empty"):
        load_update_key(path)
    with pytest.raises(RegistryError, match="does not exist; create one with"):
        load_update_key(tmp_path / "missing.key")


# ----------------------------------------------------------------------------- verification
def test_a_good_signed_update_is_loaded(tmp_path: Path, current: Manifest) -> None:
    where = _save(tmp_path / "new", seed=1)
    update = sign(build_update(where, policy="keep"), KEY)
    # the worker runs this in a thread, off its event loop
    with ThreadPoolExecutor(1) as pool:
        verified = pool.submit(verify_update, update, key=KEY, current=current).result()
    assert verified.policy == "keep" and verified.note is None
    assert verified.manifest.version == update.version and verified.update == update
    assert not verified.model.training
    expected = load_file(str(where / "weights.safetensors"))
    assert torch.equal(verified.model.state_dict()["decoder.bias"], expected["decoder.bias"])
    # no key configured: unsigned updates are accepted
    unsigned = build_update(where, policy="reset")
    assert verify_update(unsigned, key=None, current=current).policy == "reset"


def test_signature_reasons(tmp_path: Path, current: Manifest) -> None:
    update = build_update(_save(tmp_path / "new", seed=1), policy="keep")
    assert _rejected(update, current, key=KEY).reason == "unsigned"
    assert _rejected(sign(update, b"z" * 32), current, key=KEY).reason == "bad_signature"


def test_unreadable(tmp_path: Path, current: Manifest) -> None:
    where = _save(tmp_path / "new", seed=1)
    update = build_update(where, policy="keep")
    (where / "weights.safetensors").unlink()
    err = _rejected(update, current)
    assert err.reason == "unreadable" and "weights.safetensors is missing" in str(err)
    gone = dataclasses.replace(update, location=str(tmp_path / "nowhere"))
    err = _rejected(gone, current)
    assert err.reason == "unreadable" and "is the registry mounted" in str(err)
    # a weights file that is not safetensors at all (with a matching recorded sha256)
    (where / "weights.safetensors").write_bytes(b"\x00" * 64)
    manifest = json.loads((where / "manifest.json").read_text())
    manifest["weights_sha256"] = sha256_file(where / "weights.safetensors")
    (where / "manifest.json").write_text(json.dumps(manifest))
    err = _rejected(build_update(where, policy="keep"), current)
    assert err.reason == "unreadable" and "not a readable safetensors file" in str(err)


def test_checksum(tmp_path: Path, current: Manifest) -> None:
    where = _save(tmp_path / "new", seed=1)
    update = build_update(where, policy="keep")
    weights = where / "weights.safetensors"
    pristine = weights.read_bytes()
    data = bytearray(pristine)
    data[-5] ^= 0x01  # one bit of one weight
    weights.write_bytes(bytes(data))
    err = _rejected(update, current)
    assert err.reason == "checksum" and "does not match the manifest" in str(err)
    weights.write_bytes(pristine)
    verify_update(update, key=None, current=current)
    # the manifest changed after the announcement
    manifest = json.loads((where / "manifest.json").read_text())
    manifest["metrics"] = {"acc": 1.0}
    (where / "manifest.json").write_text(json.dumps(manifest))
    err = _rejected(update, current)
    assert err.reason == "checksum" and "announced sha256" in str(err)
    # an announcement whose own fields disagree with the files it names
    fresh = build_update(where, policy="keep")
    wrong = dataclasses.replace(fresh, weights_sha256="0" * 64)
    assert _rejected(wrong, current).reason == "checksum"
    arch = {**fresh.architecture, "hidden_size": 99}
    err = _rejected(dataclasses.replace(fresh, architecture=arch), current)
    assert err.reason == "checksum" and "hidden_size 99 -> 8" in str(err)


def test_shapes(tmp_path: Path, current: Manifest) -> None:
    where = _save(tmp_path / "new", seed=1)

    def narrower(tensors: dict[str, torch.Tensor]) -> None:
        tensors["decoder.bias"] = tensors["decoder.bias"][:-1].clone()

    _rewrite(where, narrower)
    err = _rejected(build_update(where, policy="keep"), current)
    assert err.reason == "shapes" and "'decoder.bias' has shape" in str(err)
    _rewrite(where, lambda t: t.pop("decoder.bias"))
    err = _rejected(build_update(where, policy="keep"), current)
    assert err.reason == "shapes" and "missing tensors ['decoder.bias']" in str(err)


def test_non_finite(tmp_path: Path, current: Manifest) -> None:
    where = _save(tmp_path / "new", seed=1)

    def poison(tensors: dict[str, torch.Tensor]) -> None:
        tensors["rnn.weight_hh_l0"][0, 0] = float("nan")

    _rewrite(where, poison)
    err = _rejected(build_update(where, policy="keep"), current)
    assert err.reason == "non_finite" and "non-finite" in str(err)


def test_incompatible(tmp_path: Path, current: Manifest) -> None:
    other_task = _save(tmp_path / "cls", task="classify", num_labels=2, labels=["x", "y"])
    err = _rejected(build_update(other_task, policy="keep"), current)
    assert err.reason == "incompatible"
    assert "is a classify model but this worker serves next-token" in str(err)

    classifier = read_manifest(other_task)
    unmapped = _save(tmp_path / "cls3", task="classify", num_labels=3, labels=["x", "y"], seed=2)
    err = _rejected(build_update(unmapped, policy="reset"), classifier)
    assert err.reason == "incompatible"
    assert "labels ['x', 'y'] cannot be mapped onto the model's 3 outputs" in str(err)

    bidi = _save(
        tmp_path / "bi", task="classify", num_labels=2, labels=["x", "y"], bidirectional=True
    )
    err = _rejected(build_update(bidi, policy="reset"), classifier)
    assert err.reason == "incompatible" and "cannot be streamed" in str(err)


# --------------------------------------------------------------------------------- policies
def test_keep_needs_the_same_architecture_and_vocabulary(tmp_path: Path, current: Manifest) -> None:
    wider = build_update(_save(tmp_path / "wide", hidden=16, seed=1), policy="keep")
    verified = verify_update(wider, key=None, current=current)
    assert verified.policy == "rewarm" and verified.note is not None
    assert "hidden_size 8 -> 16" in verified.note and current.version in verified.note

    words = build_update(_save(tmp_path / "voc", vocab=OTHER_VOCAB, seed=1), policy="keep")
    verified = verify_update(words, key=None, current=current)
    assert verified.policy == "rewarm" and "the vocabulary differs" in str(verified.note)

    # explicit reset and rewarm are honoured whatever changed
    for policy in ("reset", "rewarm"):
        update = dataclasses.replace(wider, policy=policy)
        assert verify_update(update, key=None, current=current).policy == policy


def test_new_label_names_do_not_prevent_keep(tmp_path: Path) -> None:
    old = read_manifest(_save(tmp_path / "a", task="classify", num_labels=2, labels=["x", "y"]))
    renamed = _save(tmp_path / "b", task="classify", num_labels=2, labels=["no", "yes"], seed=3)
    verified = verify_update(build_update(renamed, policy="keep"), key=None, current=old)
    assert verified.policy == "keep" and verified.manifest.labels == ["no", "yes"]
